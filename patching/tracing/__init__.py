"""The tracing room: Gaussian-noise corruption and ROME's causal tracing, and self-repair
(direct versus total effects, the Hydra effect).

Imports `model` and `sweep` below it; the leaves (`steering`, `inspect`, `safety`) may import it."""

from patching.tracing.noise import NoiseConfig, embedding_std, subject_positions
from patching.tracing.repair import Component, RepairResult, self_repair
from patching.tracing.trace import TraceResult, causal_trace, window_layers

__all__ = ["Component", "NoiseConfig", "RepairResult", "TraceResult", "causal_trace", "embedding_std", "self_repair",
           "subject_positions", "window_layers"]
