"""The safety room: the paired harmful/harmless suite in chat format, refusal scores and rates,
and the search for the units behind refusal.

A leaf: imports the rooms below it, never `steering` or `inspect`."""

from patching.safety.prompts import PAIRS, SafetySuite, is_refusal
from patching.safety.search import RefusalScore, SafetyReport, find_safety_latents, refusal_rate

__all__ = ["PAIRS", "RefusalScore", "SafetyReport", "SafetySuite", "find_safety_latents", "is_refusal", "refusal_rate"]
