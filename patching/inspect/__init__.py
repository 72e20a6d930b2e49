"""The inspection room: latent cards (logit effect, top contexts, histogram), neuron readouts and
their exact decomposition into SAE latents, unit reports and HTML dashboards.

A leaf: imports the rooms below it, never `steering` or `safety`."""

from patching.inspect.dashboards import write_dashboards
from patching.inspect.latents import InspectConfig, LatentReport, inspect_latent, inspect_latents, logit_effect
from patching.inspect.neuron_cards import NeuronConfig, UnitReport, UnitScores, inspect_units, unit_scores
from patching.inspect.neurons import Decomposition, Neuron, NeuronDirection, decompose, readout
from sae.deprecation import renamed_attributes

__all__ = ["Decomposition", "InspectConfig", "LatentReport", "Neuron", "NeuronConfig", "NeuronDirection", "UnitReport", "UnitScores", "decompose", "inspect_latent", "inspect_latents", "inspect_units", "logit_effect", "readout", "unit_scores", "write_dashboards"]

__getattr__ = renamed_attributes(__name__, {"Direction": lambda: NeuronDirection})
