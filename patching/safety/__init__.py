"""The safety room: the paired harmful/harmless suite in chat format, refusal scores and rates,
the units behind refusal (SAE latents, MLP neurons, residual dimensions, the refusal direction)
on the same curves, dynamic activation patching, and the error share on the named pair set
(Eiffel, IOI and the suite's pairs).

A leaf: imports the rooms below it, never `steering` or `inspect`."""

from patching.safety.curves import UnitCurve
from patching.safety.direction import DirectionReport, refusal_directions
from patching.safety.dynamic import GuidedGeneration, UnitSet, guided_generate
from patching.safety.pair_set import NamedPair, PairSetConfig, PairSetShares, named_pairs, pair_set_error_share
from patching.safety.prompts import PAIRS, SafetySuite, is_refusal
from patching.safety.report import SafetyReport
from patching.safety.score import RefusalScore, refusal_rate
from patching.safety.search import SafetyConfig, find_safety_latents

__all__ = ["DirectionReport", "GuidedGeneration", "NamedPair", "PAIRS", "PairSetConfig", "PairSetShares", "RefusalScore",
           "SafetyConfig", "SafetyReport", "SafetySuite", "UnitCurve", "UnitSet", "find_safety_latents", "guided_generate",
           "is_refusal", "named_pairs", "pair_set_error_share", "refusal_directions", "refusal_rate"]
