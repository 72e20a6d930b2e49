"""The safety room: the paired harmful/harmless suite in chat format, refusal scores and rates,
the units behind refusal (SAE latents, MLP neurons, residual dimensions, the refusal direction)
on the same curves, and dynamic activation patching.

A leaf: imports the rooms below it, never `steering` or `inspect`."""

from patching.safety.curves import UnitCurve
from patching.safety.direction import DirectionReport, refusal_directions
from patching.safety.dynamic import GuidedGeneration, UnitSet, guided_generate
from patching.safety.prompts import PAIRS, SafetySuite, is_refusal
from patching.safety.report import SafetyReport
from patching.safety.score import RefusalScore, refusal_rate
from patching.safety.search import SafetyConfig, find_safety_latents

__all__ = ["DirectionReport", "GuidedGeneration", "PAIRS", "RefusalScore", "SafetyConfig", "SafetyReport", "SafetySuite", "UnitCurve",
           "UnitSet", "find_safety_latents", "guided_generate", "is_refusal", "refusal_directions",
           "refusal_rate"]
