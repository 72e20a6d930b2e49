"""Nodes and receivers: the vertices of a transformer's computational graph, as path patching and
edge attribution see it.

The residual stream is the sum of the embedding and every head's and MLP's output (Elhage et al.
2021, "A Mathematical Framework for Transformer Circuits"), so an upstream `Node` is a term of that
sum and a downstream `Receiver` is one place the sum is read: a head's query, key or value input, an
MLP's input, or the logits. An edge runs from a node to a receiver whose read lies after the node's
write (`reaches`). Under grouped-query attention a key or value receiver is the shared key/value
head (its index counts key/value heads): every query head of its group reads that one input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from patching.errors import PatchingError
from patching.model import tl_compat, tl_paths
from patching.model.sites import Site

NodeKind = Literal["embed", "head", "mlp"]
ReceiverKind = Literal["q", "k", "v", "mlp", "logits"]
NODE_KINDS: tuple[str, ...] = ("embed", "head", "mlp")
RECEIVER_KINDS: tuple[str, ...] = ("q", "k", "v", "mlp", "logits")


def _check_index(value: Any, name: str, owner: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PatchingError(f"{owner}.{name} must be a non-negative int, got {value!r}")


@dataclass(frozen=True)
class Node:
    """An upstream node: the token (and positional) embedding, one attention head's output
    (`z[head] @ W_O[head]`), or one MLP's output."""

    kind: NodeKind
    """`embed`, `head` or `mlp`."""
    layer: int | None = None
    """Block index; None for `embed`."""
    head: int | None = None
    """Query head index, for `head` only."""

    def __post_init__(self) -> None:
        if self.kind not in NODE_KINDS:
            raise PatchingError(f"Node.kind must be one of {NODE_KINDS}, got {self.kind!r}")
        if (self.kind == "embed") != (self.layer is None):
            raise PatchingError(f"Node: layer= is needed for kind {self.kind!r} and only then (got layer={self.layer!r})")
        if self.layer is not None:
            _check_index(self.layer, "layer", "Node")
        if (self.kind == "head") != (self.head is not None):
            raise PatchingError(f"Node: head= is needed for kind='head' and only then (got kind={self.kind!r}, head={self.head!r})")
        if self.head is not None:
            _check_index(self.head, "head", "Node")

    @property
    def write_slot(self) -> int:
        """Where in the forward pass the node writes to the residual stream (see `read_slot`)."""
        if self.kind == "embed":
            return 0
        return 4 * self.layer + (2 if self.kind == "head" else 4)

    def check(self, model: Any) -> "Node":
        """Raise `PatchingError` unless the model has this node; return self."""
        n_layers = tl_compat.n_layers(model)
        if self.layer is not None and self.layer >= n_layers:
            raise PatchingError(f"{self.label()} is out of range: the model has layers 0..{n_layers - 1}")
        if self.kind == "head" and self.head >= tl_compat.n_heads(model):
            raise PatchingError(f"{self.label()} is out of range: the model has heads 0..{tl_compat.n_heads(model) - 1}")
        if self.kind == "mlp" and not tl_paths.has_mlps(model):
            raise PatchingError(f"{self.label()}: the model has no MLPs (attn-only)")
        return self

    def label(self) -> str:
        return {"embed": "embed", "head": f"L{self.layer}H{self.head}", "mlp": f"MLP{self.layer}"}[self.kind]


@dataclass(frozen=True)
class Receiver:
    """A downstream node's input: a head's query, key or value input (`q`, `k`, `v`; for `k` and
    `v` the head is a key/value head), an MLP's input (`mlp`), or the logits (`logits`: the final
    residual stream, read through the final norm)."""

    kind: ReceiverKind
    """`q`, `k`, `v`, `mlp` or `logits`."""
    layer: int | None = None
    """Block index; None for `logits`."""
    head: int | None = None
    """Head index for `q` (a query head) and `k`/`v` (a key/value head)."""

    def __post_init__(self) -> None:
        if self.kind not in RECEIVER_KINDS:
            raise PatchingError(f"Receiver.kind must be one of {RECEIVER_KINDS}, got {self.kind!r}")
        if (self.kind == "logits") != (self.layer is None):
            raise PatchingError(f"Receiver: layer= is needed for kind {self.kind!r} and only then (got layer={self.layer!r})")
        if self.layer is not None:
            _check_index(self.layer, "layer", "Receiver")
        if (self.kind in ("q", "k", "v")) != (self.head is not None):
            raise PatchingError(f"Receiver: head= is needed for kinds q, k, v and only then (got kind={self.kind!r}, "
                                f"head={self.head!r})")
        if self.head is not None:
            _check_index(self.head, "head", "Receiver")

    def read_slot(self, model: Any) -> int:
        """Where the receiver reads the stream. Block L's heads read at 4L+1 and write at 4L+2, its
        MLP reads at 4L+3 (4L+1 when it runs parallel to the attention) and writes at 4L+4; the
        embedding writes at 0 and the logits read at 4·n_layers+1."""
        if self.kind == "logits":
            return 4 * tl_compat.n_layers(model) + 1
        if self.kind == "mlp":
            return 4 * self.layer + (1 if tl_paths.parallel_blocks(model) else 3)
        return 4 * self.layer + 1

    def check(self, model: Any) -> "Receiver":
        """Raise `PatchingError` unless the model has this receiver; return self."""
        n_layers = tl_compat.n_layers(model)
        if self.layer is not None and self.layer >= n_layers:
            raise PatchingError(f"{self.label()} is out of range: the model has layers 0..{n_layers - 1}")
        if self.kind in ("q", "k", "v"):
            count = tl_compat.n_heads(model) if self.kind == "q" else tl_compat.n_kv_heads(model)
            if self.head >= count:
                what = "heads" if self.kind == "q" else "key/value heads"
                raise PatchingError(f"{self.label()} is out of range: the model has {what} 0..{count - 1}")
        if self.kind == "mlp" and not tl_paths.has_mlps(model):
            raise PatchingError(f"{self.label()}: the model has no MLPs (attn-only)")
        return self

    def label(self) -> str:
        if self.kind == "logits":
            return "logits"
        if self.kind == "mlp":
            return f"MLP{self.layer}.in"
        return f"L{self.layer}H{self.head}.{self.kind}"


STREAM_SLOTS = {"resid_pre": 0.5, "resid_mid": 2.5, "resid_post": 4.5}
"""Offsets within block L's slots (4L + offset) of the residual stream an SAE site sees: resid_pre L
after MLP L−1 writes (4L) and before block L's heads read (4L+1); resid_mid after the heads write."""


@dataclass(frozen=True)
class LatentNode:
    """One SAE latent (`latent` set) or the error node (`latent=None`) at a residual-stream site,
    at one position or summed over positions (`pos=None`).

    As a sender it writes its change of `f_i · W_dec[i]` (or of the error) into the stream at its
    site; as a receiver it reads that stream through its SAE's encoder (Marks et al. 2024, §2)."""

    site: Site
    """Where the SAE is spliced."""
    latent: int | None = None
    """Latent index; None for the error node."""
    pos: int | None = None
    """Token position; None for every position together."""

    @property
    def kind(self) -> Literal["latent", "error"]:
        return "error" if self.latent is None else "latent"

    @property
    def layer(self) -> int:
        """The block whose hook reads or writes the site."""
        return self.site.layer

    @property
    def write_slot(self) -> float:
        """Where the site's stream lies among the node slots (`Node.write_slot`, `Receiver.read_slot`)."""
        return 4 * self.site.layer + STREAM_SLOTS[self.site.kind]

    def read_slot(self, model: Any) -> float:
        """A latent or error node reads the stream at its site: every write before it reaches it."""
        return self.write_slot

    def check(self, model: Any, saes: Mapping[Site, Any] | None) -> "LatentNode":
        """Raise `PatchingError` unless one of `saes` sits at this node's site and has its latent; return self."""
        if self.site.kind not in STREAM_SLOTS or self.site.head is not None:
            raise PatchingError(f"{self.label()}: latent nodes sit on the residual stream ({tuple(STREAM_SLOTS)})")
        if not saes or self.site not in saes:
            raise PatchingError(f"{self.label()}: no SAE given at {self.site} (saes= holds "
                                f"{[str(s) for s in (saes or {})]})")
        for name, value in (("latent", self.latent), ("pos", self.pos)):
            if value is not None:
                _check_index(value, name, "LatentNode")
        if self.latent is not None and self.latent >= saes[self.site].d_sae:
            raise PatchingError(f"{self.label()}: latent out of range for d_sae={saes[self.site].d_sae}")
        return self

    def label(self) -> str:
        where = f"L{self.site.layer}.{self.site.kind}"
        what = "err" if self.latent is None else f"#{self.latent}"
        return f"{where}/{what}" + ("" if self.pos is None else f"@{self.pos}")


def reaches(node: Node | LatentNode, receiver: Receiver | LatentNode, model: Any) -> bool:
    """Whether `node`'s output is part of the stream `receiver` reads (a direct edge exists)."""
    return node.write_slot < receiver.read_slot(model)


def upstream_nodes(model: Any, layers: Sequence[int] | None = None, *, embed: bool = True,
                   mlps: bool = True) -> list[Node]:
    """The embedding, then every head and MLP of `layers` (all by default), in forward order."""
    layers = range(tl_compat.n_layers(model)) if layers is None else layers
    nodes = [Node("embed")] if embed else []
    for layer in layers:
        nodes += [Node("head", layer, h) for h in range(tl_compat.n_heads(model))]
        if mlps and tl_paths.has_mlps(model):
            nodes.append(Node("mlp", layer))
    return [node.check(model) for node in nodes]


def receivers_of(model: Any, layers: Sequence[int] | None = None,
                 kinds: Sequence[str] = RECEIVER_KINDS) -> list[Receiver]:
    """Every receiver of `kinds` in `layers` (all by default), and the logits if `kinds` has them."""
    unknown = [kind for kind in kinds if kind not in RECEIVER_KINDS]
    if unknown:
        raise PatchingError(f"receiver kinds must be among {RECEIVER_KINDS}, got {unknown}")
    layers = range(tl_compat.n_layers(model)) if layers is None else layers
    out = []
    for layer in layers:
        for kind in ("q", "k", "v"):
            if kind in kinds:
                count = tl_compat.n_heads(model) if kind == "q" else tl_compat.n_kv_heads(model)
                out += [Receiver(kind, layer, h) for h in range(count)]  # type: ignore[arg-type]
        if "mlp" in kinds and tl_paths.has_mlps(model):
            out.append(Receiver("mlp", layer))
    if "logits" in kinds:
        out.append(Receiver("logits"))
    return [receiver.check(model) for receiver in out]


def check_graph(model: Any, senders: Any, receivers: Any,
                saes: Mapping[Site, Any] | None = None) -> tuple[list[Any], list[Any]]:
    """Validate senders and receivers against the model before any forward pass; with `saes` (by
    site) `LatentNode`s are senders and receivers too, each checked against its SAE."""
    reason = tl_paths.unsupported_for_paths(model)
    if reason is not None:
        raise PatchingError(f"path patching and edge attribution cannot run on {tl_compat.model_name(model)}: {reason}")
    for name, items, cls in (("senders", senders, Node), ("receivers", receivers, Receiver)):
        kinds = (cls,) if saes is None else (cls, LatentNode)
        if isinstance(items, (str, Node, Receiver, LatentNode)) or not isinstance(items, Sequence) or not items:
            raise PatchingError(f"{name} must be a non-empty list of {' or '.join(k.__name__ for k in kinds)} values, "
                                f"got {items!r}")
        bad = [item for item in items if not isinstance(item, kinds)]
        if bad:
            hint = " (pass saes= to use SAE latents and error nodes)" if isinstance(bad[0], LatentNode) else ""
            raise PatchingError(f"{name} must hold {' or '.join(k.__name__ for k in kinds)} values, got "
                                f"{type(bad[0]).__name__} ({bad[0]!r}){hint}")

    def checked(item: Any) -> Any:
        return item.check(model, saes) if isinstance(item, LatentNode) else item.check(model)
    return [checked(node) for node in senders], [checked(receiver) for receiver in receivers]
