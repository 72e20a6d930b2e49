"""The steering room: steering vectors from decoder rows (add, clamp), Top-1 versus Top-K
comparisons of effect against cost, and built-in concepts.

A leaf: imports the rooms below it, never `inspect` or `safety`."""

from patching.steering.compare import CompareSettings, Concept, SteeringComparison, compare_steering
from patching.steering.concepts import CONCEPTS
from patching.steering.choice import LatentChoice, contrast_latents, latents_from_result
from patching.steering.steer import (
    SteeredGeneration,
    Steering,
    SteeringConfig,
    SteeringError,
    generate_steered,
    steer,
    steering_vector,
)

__all__ = ["CONCEPTS", "CompareSettings", "Concept", "LatentChoice", "SteeredGeneration", "Steering", "SteeringComparison", "SteeringConfig", "SteeringError", "compare_steering", "contrast_latents", "generate_steered", "latents_from_result", "steer", "steering_vector"]
