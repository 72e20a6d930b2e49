// latentpatch serve: the pages' one script (plain JavaScript, no build step, no CDN).
// Text from the server is inserted with textContent; only the latent card, rendered by the server's
// autoescaped template, is inserted as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const page = document.body.dataset.page;
let info = null;
let currentJob = null;

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function api(url, body) {
  const options = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(url, options);
  const data = await response.json().catch(() => ({error: `HTTP ${response.status}`}));
  if (!response.ok) throw new Error(data.error || data.detail || `HTTP ${response.status}`);
  return data;
}

function sae() { return Number($("sae").value || 0); }

function fixed(value, digits) { return value === null || value === undefined ? "–" : Number(value).toFixed(digits); }

function latentLink(latent) {
  const link = el("a", `#${latent}`, {href: "#", "data-latent": String(latent)});
  link.className = "latent";
  link.addEventListener("click", (event) => { event.preventDefault(); openCard(latent); });
  return link;
}

async function openCard(latent) {
  showError("");
  $("card").textContent = `loading latent ${latent}…`;
  try {
    const response = await fetch(`/api/card/${sae()}/${latent}`);
    if (!response.ok) {
      const data = await response.json().catch(() => ({}));
      throw new Error(data.error || `HTTP ${response.status}`);
    }
    $("card").innerHTML = await response.text();  // server-rendered, autoescaped (patching.inspect.pages)
    $("card").scrollIntoView({behavior: "smooth", block: "start"});
  } catch (err) { $("card").textContent = ""; showError(err.message); }
}

function table(node, header, rows) {
  node.textContent = "";
  const head = el("tr");
  header.forEach((h) => head.appendChild(el("th", h)));
  node.appendChild(head);
  rows.forEach((cells) => {
    const tr = el("tr");
    cells.forEach((cell) => {
      const td = el("td");
      if (cell instanceof Node) td.appendChild(cell); else td.textContent = cell;
      if (typeof cell === "string" && /^-?[0-9.]+$/.test(cell)) td.className = "num";
      tr.appendChild(td);
    });
    node.appendChild(tr);
  });
}

// A job: POST, then poll its events until it ends; progress and a cancel button meanwhile.
async function runJob(url, body, onEvent) {
  showError("");
  const started = await api(url, body);
  currentJob = started.id;
  $("job").hidden = false;
  $("run").disabled = true;
  let since = 0;
  try {
    for (;;) {
      // a long poll: answered at the next result, or after 0.5 s to refresh the progress bar
      const state = await api(`/api/jobs/${started.id}?since=${since}&wait=0.5`);
      state.events.forEach(onEvent);
      since = state.n_events;
      $("phase").textContent = `${state.phase} (${state.seconds.toFixed(1)} s)`;
      if (state.progress === null) $("progress").removeAttribute("value"); else $("progress").value = state.progress;
      if (state.state !== "running") {
        if (state.error) showError(state.error);
        document.body.dataset.job = state.state;
        return state;
      }
    }
  } finally {
    $("job").hidden = true;
    $("run").disabled = false;
    currentJob = null;
  }
}

function guard(fn) {
  return async (event) => {
    if (event) event.preventDefault();
    document.body.dataset.job = "running";
    try { await fn(); } catch (err) { showError(err.message); document.body.dataset.job = "refused"; }
  };
}

function pairBody() {
  return {sae: sae(), clean: $("clean").value, corrupted: $("corrupted").value, answer: $("answer").value, wrong: $("wrong").value};
}

// ---- latents
async function search() {
  const result = await api("/api/search", {sae: sae(), text: $("text").value});
  table($("results"), ["latent", "largest activation", "on token", "position"],
        result.latents.map((r) => [latentLink(r.latent), fixed(r.activation, 4), JSON.stringify(r.token), String(r.position)]));
  const strip = $("tokens");
  strip.textContent = "";
  result.tokens.forEach((t) => {
    const box = el("span", null, {class: "token"});
    box.appendChild(el("b", t.token));
    t.latents.forEach((l) => { box.appendChild(el("br")); box.appendChild(latentLink(l.latent)); box.appendChild(document.createTextNode(` ${fixed(l.activation, 2)}`)); });
    strip.appendChild(box);
  });
  document.body.dataset.job = "done";
}

// ---- patch
function drawHeatmap(h) {
  $("summary").textContent = `${h.units} units patched exactly; logit difference clean ${fixed(h.metric_clean, 3)}, corrupted ${fixed(h.metric_corrupted, 3)}.`;
  const node = $("heatmap");
  node.textContent = "";
  const head = el("tr");
  head.appendChild(el("th", "token \\ latent"));
  h.latents.forEach((l) => { const th = el("th"); th.appendChild(latentLink(l)); head.appendChild(th); });
  node.appendChild(head);
  const scale = Math.max(1e-9, ...h.effects.flat().filter((v) => v !== null).map(Math.abs));
  h.tokens.forEach((token, p) => {
    const tr = el("tr");
    tr.appendChild(el("th", `${p} ${JSON.stringify(token)}`));
    h.effects[p].forEach((v, j) => {
      const td = el("td", v === null ? "" : v.toFixed(2), {"data-latent": String(h.latents[j]), "data-position": String(p)});
      if (v !== null) {
        td.title = `latent ${h.latents[j]} at ${p}: ${v}`;
        const a = Math.min(1, Math.abs(v) / scale);
        td.style.background = v >= 0 ? `rgba(200, 40, 40, ${a})` : `rgba(40, 80, 200, ${a})`;
        td.className = "cell";
        td.addEventListener("click", () => openCard(h.latents[j]));
      }
      tr.appendChild(td);
    });
    node.appendChild(tr);
  });
  $("top-title").hidden = false;
  table($("top"), ["latent", "position", "token", "effect"],
        h.top.map((r) => [latentLink(r.latent), String(r.position), JSON.stringify(r.token), fixed(r.effect, 4)]));
}

function drawCheck(c) {
  $("check-title").hidden = false;
  $("check-summary").textContent = `Spearman ${fixed(c.spearman, 3)} over ${c.n_checked} units; recall@${c.k} ${fixed(c.recall_at_k, 2)}; ` +
    `largest exact |effect| among the random units outside AtP's top ${c.k}: ${fixed(c.max_missed_effect, 4)}.`;
  table($("check"), ["unit", "AtP", "exact"],
        c.units.map((u) => [u.latent === null ? u.unit : latentLink(u.latent), fixed(u.atp, 4), fixed(u.exact, 4)]));
}

async function patch() {
  ["heatmap", "top", "check"].forEach((id) => { $(id).textContent = ""; });
  $("check-summary").textContent = "";
  await runJob("/api/sweep", pairBody(), (e) => {
    if (e.kind === "heatmap") drawHeatmap(e);
    if (e.kind === "check") drawCheck(e);
  });
}

// ---- steer
async function steerRun() {
  ["steered", "unsteered", "kl", "chosen"].forEach((id) => { $(id).textContent = ""; });
  const lines = (id) => $(id).value.split("\n").map((s) => s.trim()).filter((s) => s);
  const ids = $("latents").value.split(/[\s,]+/).filter((s) => s).map(Number);
  const body = {sae: sae(), prompt: $("prompt").value, method: $("method").value, scale: $("scale").value,
                coefficient: Number($("coefficient").value), max_new_tokens: Number($("max_new_tokens").value), k: Number($("k").value)};
  if (ids.length) body.latents = ids; else { body.positive = lines("positive"); body.negative = lines("negative"); }
  await runJob("/api/steer", body, (e) => {
    if (e.kind === "latents") {
      const chosen = $("chosen");
      chosen.textContent = `steering with (${e.source}): `;
      e.latents.forEach((l) => { chosen.appendChild(latentLink(l)); chosen.appendChild(document.createTextNode(" ")); });
    }
    if (e.kind === "token" || e.kind === "continuation") $(e.column).textContent = e.text;
    if (e.kind === "continuation") $(e.column).dataset.done = "1";
    if (e.kind === "kl") { $("kl").textContent = `KL(unsteered || steered) on neutral text: ${fixed(e.kl, 5)} nats`; $("kl").dataset.kl = String(e.kl); }
  });
}

// ---- circuits: the latentpatch.graph/1 document drawn as SVG, nodes by layer (left to right), edge width
// by |weight| (red raises the metric, blue lowers it), latent nodes linked to their cards.
const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function drawGraph(graph) {
  const layers = [...new Set(graph.nodes.map((n) => n.layer))].sort((a, b) => a - b);
  const columns = new Map(layers.map((layer) => [layer, graph.nodes.filter((n) => n.layer === layer)]));
  const height = 70 + 46 * Math.max(...[...columns.values()].map((c) => c.length));
  const width = 1000, step = layers.length > 1 ? (width - 160) / (layers.length - 1) : 0;
  const at = new Map();
  layers.forEach((layer, i) => columns.get(layer).forEach((n, j) => at.set(n.id, [80 + i * step, 40 + j * 46])));
  const picture = svg("svg", {viewBox: `0 0 ${width} ${height}`, width: "100%", role: "img", "aria-label": "circuit graph"});
  const biggest = Math.max(1e-9, ...graph.edges.map((e) => Math.abs(e.weight)));
  graph.edges.forEach((e) => {
    const [x1, y1] = at.get(e.source), [x2, y2] = at.get(e.target);
    const line = svg("line", {x1, y1, x2, y2, stroke: e.weight >= 0 ? "#c62828" : "#1565c0", "stroke-opacity": 0.7,
                              "stroke-width": 0.5 + 5 * Math.abs(e.weight) / biggest});
    line.appendChild(svg("title", {}, `${e.source} → ${e.target}: ${e.weight.toFixed(4)}`));
    picture.appendChild(line);
  });
  const colours = {embedding: "#9e9e9e", head: "#fb8c00", mlp: "#43a047", latent: "#8e24aa", error: "#616161", logit: "#212121"};
  graph.nodes.forEach((n) => {
    const [x, y] = at.get(n.id);
    const group = svg("g", {"data-node": n.id});
    group.appendChild(svg("circle", {cx: x, cy: y, r: 5 + 10 * Math.min(1, n.influence || 0), fill: colours[n.kind] || "#000"}));
    group.appendChild(svg("text", {x: x + 14, y: y + 4, "font-size": 11}, n.label));
    group.appendChild(svg("title", {}, `${n.id} (${n.kind}), influence ${fixed(n.influence, 3)}`));
    const index = n.kind === "latent" && info ? info.saes.findIndex((s) => s.site === n.site) : -1;
    if (index >= 0) {
      group.style.cursor = "pointer";
      group.addEventListener("click", () => { $("sae").value = String(index); openCard(n.latent); });
    }
    picture.appendChild(group);
  });
  $("graph").appendChild(picture);
}

async function circuit() {
  ["edges", "graph", "circuit-summary"].forEach((id) => { $(id).textContent = ""; });
  const body = Object.assign(pairBody(), {k: Number($("k").value), nodes: $("nodes").value});
  await runJob("/api/circuit", body, (e) => {
    if (e.kind !== "circuit") return;
    const scores = Object.entries(e.scores).map(([name, v]) => `${name} ${typeof v === "number" ? fixed(v, 3) : v}`);
    $("circuit-summary").textContent = `${e.edges.length} edges; ${scores.join(", ")}.`;
    if (e.graph) drawGraph(e.graph);
    table($("edges"), ["sender", "receiver", "estimate", "exact"],
          e.edges.map((r) => [r.sender, r.receiver, fixed(r.estimate, 4), fixed(r.exact, 4)]));
  });
}

async function start() {
  try {
    info = await api("/api/info");
    $("model").textContent = ` model ${info.model} (${info.n_layers} layers)`;
    info.saes.forEach((s) => $("sae").appendChild(el("option", `${s.name} (${s.site}, ${s.d_sae} latents)`, {value: String(s.index)})));
  } catch (err) { showError(err.message); }
  $("cancel").addEventListener("click", () => { if (currentJob) api(`/api/jobs/${currentJob}/cancel`, {}).catch((err) => showError(err.message)); });
  const actions = {latents: search, patch: patch, steer: steerRun, circuits: circuit};
  if (actions[page]) $("form").addEventListener("submit", guard(actions[page]));
  if (page === "latents") $("open").addEventListener("click", guard(async () => { await openCard(Number($("latent-id").value)); document.body.dataset.job = "done"; }));
  document.body.dataset.ready = "1";
}

start();
