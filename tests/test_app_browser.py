"""`latentpatch serve` end to end: Debian's Chromium driven by Selenium through Debian's chromedriver (no
browser download) over the app served on a free local port, on the default model cut to 2 layers; and the
command itself, started as a subprocess, printing its one JSON line and answering on that URL."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import make_sae
from test_app import naive_kl


EIFFEL = {"clean": "The Eiffel Tower is located in the city of", "corrupted": "The Colosseum is located in the city of",
          "answer": " Paris", "wrong": " Rome"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The default model cut to 2 layers, a random SAE at blocks.1.hook_resid_pre, and the app on a free
    local port, served by uvicorn on a thread of this process."""
    import socket

    import uvicorn

    from latentpatch.app import Workbench, create_app
    from patching import load_model

    model = load_model(n_layers=2)
    sae = make_sae(model.cfg.d_model, 128, hook_name="blocks.1.hook_resid_pre", model_name=model.cfg.model_name, seed=3)
    texts = ["The Eiffel Tower is in Paris, the capital of France.", "Rome is the capital of Italy and home of the Colosseum.",
             "She bought bread, cheese and wine at the market before the train left."]
    bench = Workbench(model, [sae], ["random-l1"], card_texts=texts)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(bench), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", model, sae
    server.should_exit = True
    thread.join(10)
    listener.close()


@pytest.fixture(scope="module")
def driver(served):
    import shutil

    from browser import chromium

    binary = chromium()
    chromedriver = shutil.which("chromedriver")
    if chromedriver is None:
        pytest.skip("Debian's chromium-driver is missing (make browser installs it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1800", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield browser
    browser.quit()


def _finish(driver, timeout: float = 240.0) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: d.find_element("tag name", "body").get_attribute("data-job")
                                         in ("done", "failed", "cancelled", "refused"))
    return driver.find_element("tag name", "body").get_attribute("data-job")


def _open(driver, url: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1")
    assert driver.find_element("id", "error").is_displayed() is False


def _fill(driver, **values: str) -> None:
    for name, value in values.items():
        box = driver.find_element("id", name)
        box.clear()
        box.send_keys(value)


@pytest.mark.browser
@pytest.mark.default_model
def test_the_app_in_chromium_shows_the_python_apis_numbers(served, driver, tmp_path):
    from patching import LogitDiff, generate_steered, patch_latents

    url, model, sae = served
    for page in ("", "latents", "patch", "steer", "circuits"):
        _open(driver, f"{url}/{page}")
        assert "random-l1" in driver.find_element("id", "sae").text
    _open(driver, f"{url}/latents")
    _fill(driver, text="The Eiffel Tower is located in Paris")
    driver.find_element("id", "run").click()
    assert _finish(driver) == "done"
    tokens = model.to_tokens("The Eiffel Tower is located in Paris")
    _, cache = model.run_with_cache(tokens, names_filter=sae.cfg.hook_name)
    best = sae.encode(cache[sae.cfg.hook_name])[0, 1:].max(0).values  # BOS left out
    expected = [i for i in torch.argsort(best, descending=True, stable=True).tolist() if best[i] > 0][:20]
    rows = [[td.text for td in tr.find_elements("tag name", "td")] for tr in driver.find_elements("css selector", "#results tr")[1:]]
    assert [int(r[0][1:]) for r in rows] == expected
    assert [float(r[1]) for r in rows] == pytest.approx([float(best[i]) for i in expected], abs=1e-4)

    _open(driver, f"{url}/patch")
    _fill(driver, **EIFFEL)
    driver.find_element("id", "run").click()
    assert _finish(driver) == "done"
    metric = LogitDiff(*[int(model.to_tokens(EIFFEL[w], prepend_bos=False)[0, 0]) for w in ("answer", "wrong")])
    exact = patch_latents(model, sae, EIFFEL["clean"], EIFFEL["corrupted"], metric, progress=False)
    rows = [[td.text for td in tr.find_elements("tag name", "td")] for tr in driver.find_elements("css selector", "#top tr")[1:]]
    assert rows == [[f"#{e.latent}", str(e.position), f'"{e.token}"', f"{e.effect:.4f}"] for e in exact.top(10)]
    assert driver.find_element("id", "check-summary").text.startswith("Spearman")
    strongest = exact.top(1)[0]
    driver.find_element("css selector", f'#heatmap td[data-latent="{strongest.latent}"][data-position="{strongest.position}"]').click()
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 120).until(lambda d: f"Latent {strongest.latent}" in d.find_element("id", "card").text)
    driver.save_screenshot(str(tmp_path / "patch.png"))
    assert (tmp_path / "patch.png").stat().st_size > 20_000  # a rendered page, not a blank one

    _fill(driver, corrupted="The Colosseum in Rome is located in the city of")
    driver.find_element("id", "run").click()
    assert _finish(driver) == "refused"
    assert "different token lengths" in driver.find_element("id", "error").text

    _open(driver, f"{url}/steer")
    _fill(driver, prompt="My favourite city is", latents="5, 17", coefficient="40", max_new_tokens="8")
    driver.find_element("id", "run").click()
    assert _finish(driver) == "done"
    reference = generate_steered(model, sae, [5, 17], "My favourite city is", method="add", coefficient=40.0, max_new_tokens=8)
    assert driver.find_element("id", "steered").text == reference.steered[0]
    assert driver.find_element("id", "unsteered").text == reference.unsteered[0]
    from patching import steer
    from patching.model.tokens import padded_tokens
    from patching.steering.concepts import NEUTRAL

    tokens, mask = padded_tokens(model, list(NEUTRAL))
    with torch.inference_mode():
        base = model(tokens)
        with steer(model, sae, [5, 17], method="add", coefficient=40.0):
            steered = model(tokens)
    assert float(driver.find_element("id", "kl").get_attribute("data-kl")) == pytest.approx(naive_kl(base, steered, mask), rel=1e-4)
    driver.save_screenshot(str(tmp_path / "steer.png"))
    _fill(driver, coefficient="1e9")
    driver.find_element("id", "run").click()
    assert _finish(driver) == "refused" and "|c| <= 1000" in driver.find_element("id", "error").text

    _open(driver, f"{url}/circuits")
    _fill(driver, **EIFFEL, k="4")
    driver.find_element("id", "run").click()
    assert _finish(driver) == "done"
    edges = driver.find_elements("css selector", "#edges tr")[1:]
    assert 1 <= len(edges) <= 4 and driver.find_element("id", "circuit-summary").text.startswith(f"{len(edges)} edges")
    assert len(driver.find_elements("css selector", "#graph svg line")) == len(edges)
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", "nodes")).select_by_value("latents")
    driver.find_element("id", "run").click()
    assert _finish(driver) == "done"
    node = driver.find_element("css selector", '#graph svg g[data-node^="L1.resid_pre/#"]')
    latent = node.get_attribute("data-node").split("#")[1]
    node.click()
    WebDriverWait(driver, 120).until(lambda d: f"Latent {latent}" in d.find_element("id", "card").text)
    driver.save_screenshot(str(tmp_path / "circuits.png"))


@pytest.mark.default_model
def test_the_serve_command_prints_its_url_and_answers_there(tmp_path):
    import json
    import signal
    import subprocess
    import sys

    import httpx

    from latentpatch.cli.serve import JSON_OUTPUT
    from patching import DEFAULT_MODEL
    from sae import save_sae

    folder = save_sae(make_sae(576, 64, hook_name="blocks.1.hook_resid_pre", model_name=DEFAULT_MODEL), tmp_path / "sae")
    command = [sys.executable, "-m", "latentpatch", "serve", str(folder), "--n-layers", "2", "--port", "0", "--json",
               "--card-documents", "2"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = json.loads(server.stdout.readline())
        assert set(line) == set(JSON_OUTPUT) and line["url"].startswith("http://127.0.0.1:") and line["n_layers"] == 2
        assert line["saes"] == [{"index": 0, "name": str(folder), "site": "blocks.1.hook_resid_pre", "d_sae": 64}]
        with httpx.Client(base_url=line["url"], timeout=60) as client:
            assert client.get("/api/info").json()["saes"] == line["saes"]
            found = client.post("/api/search", json={"text": "The Eiffel Tower"}).json()
            assert [t["token"] for t in found["tokens"]][1:] == ["The", " E", "iffel", " Tower"]
            assert client.post("/api/steer", json={"prompt": "Hi", "latents": [70]}).status_code == 400
    finally:
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=60)
    assert server.returncode in (0, 130) and "Traceback" not in err, err
