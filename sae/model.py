"""SparseAutoencoder: the dictionary that maps an activation to sparse latents and back."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor, nn

from sae.config import SAEConfig
from sae.files import read_sae_folder, save_sae

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class SAEOutput(NamedTuple):
    """What `SparseAutoencoder.forward` returns."""

    reconstruction: Float[Tensor, "... d_in"]
    """`x_hat = decode(encode(x))`."""
    latents: Float[Tensor, "... d_sae"]
    """`z = encode(x)`, non-negative and sparse."""
    pre_activations: Float[Tensor, "... d_sae"]
    """The encoder's affine output before the activation function."""


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder over one activation site.

    With `s` the normalization scale (1 when `cfg.normalization_scale` is None) and
    `c = b_dec` if `cfg.apply_b_dec_to_input` else 0::

        h     = (x / s - c) @ W_enc + b_enc                      pre-activations, (..., d_sae)
        z     = relu(h)                                          standard
              = relu(h) on the k largest entries of h, else 0    topk
              = relu(h) * (h > threshold)                        jumprelu
        x_hat = s * (z @ W_dec + b_dec)                          (..., d_in)

    `forward(x) == decode(encode(x))`. The L1 penalty weights each latent by its decoder row
    norm, `sum_i z_i * ||W_dec[i]||` (Anthropic, "Towards Monosemanticity", 2023), which makes
    the penalty invariant to rescaling a latent and its decoder row in opposite directions.
    """

    def __init__(self, cfg: SAEConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        dtype = TORCH_DTYPES[cfg.dtype]
        # Tied initialisation with unit-norm decoder rows (Anthropic, April 2024 update):
        # a fresh SAE starts close to an orthogonal projection.
        W_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=generator, dtype=torch.float32)
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
        self.W_enc = nn.Parameter(W_dec.T.contiguous().to(dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(W_dec.to(dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))

    # Provenance, read by the splicer's checks (the same names the SAELens adapter exposes).
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def hook_name(self) -> str | None:
        return self.cfg.hook_name

    @property
    def model_name(self) -> str | None:
        return self.cfg.model_name

    @property
    def model_from_pretrained_kwargs(self) -> dict:
        return dict(self.cfg.model_from_pretrained_kwargs)

    def _scale(self) -> float:
        return 1.0 if self.cfg.normalization_scale is None else float(self.cfg.normalization_scale)

    def pre_activations(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        x = x.to(self.W_enc.dtype) / self._scale()
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activation(self, h: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        if self.cfg.architecture == "topk":
            assert self.cfg.k is not None  # SAEConfig.__post_init__ requires k for topk
            top = torch.topk(h, k=self.cfg.k, dim=-1)
            return torch.zeros_like(h).scatter(-1, top.indices, top.values.relu())
        if self.cfg.architecture == "jumprelu":
            return h.relu() * (h > self.threshold).to(h.dtype)
        return h.relu()

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        return self.activation(self.pre_activations(x))

    def decode(self, z: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        return (z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) * self._scale()

    def decode_delta(
        self, z_new: Float[Tensor, "... d_sae"], z_old: Float[Tensor, "... d_sae"]
    ) -> Float[Tensor, "... d_in"]:
        """`decode(z_new) - decode(z_old)`, computed as `(z_new - z_old) @ W_dec` so that rows
        where the latents are equal give exactly zero (the decoder is affine)."""
        return ((z_new - z_old).to(self.W_dec.dtype) @ self.W_dec) * self._scale()

    def forward(self, x: Float[Tensor, "... d_in"]) -> SAEOutput:
        h = self.pre_activations(x)
        z = self.activation(h)
        return SAEOutput(reconstruction=self.decode(z), latents=z, pre_activations=h)

    def decoder_norms(self) -> Float[Tensor, " d_sae"]:
        return self.W_dec.norm(dim=-1)

    def l1_penalty(self, z: Float[Tensor, "... d_sae"]) -> Float[Tensor, "..."]:
        """`sum_i z_i * ||W_dec[i]||` per token (the scale-invariant L1 of the class docstring)."""
        return (z * self.decoder_norms()).sum(-1)

    @torch.no_grad()
    def folded(self) -> "SparseAutoencoder":
        """A copy with the normalization scale folded into the weights.

        `x/s @ W_enc = x @ (W_enc/s)`; `s * (z @ W_dec + b_dec) = z @ (s W_dec) + s b_dec`;
        and `b_dec` subtracted at the input becomes `s b_dec` measured in the unscaled space.
        The JumpReLU threshold and TopK selection act on `h`, which is unchanged.
        """
        s = self._scale()
        cfg = dataclasses.replace(self.cfg, normalization_scale=None)
        if self.cfg.normalization_scale is not None:
            extra = dict(cfg.extra_metadata, folded_normalization_scale=s)
            cfg = dataclasses.replace(cfg, extra_metadata=extra)
        out = SparseAutoencoder(cfg, generator=torch.Generator())  # weights overwritten: leave the caller's RNG alone
        out.load_state_dict(
            {**self.state_dict(), "W_enc": self.W_enc / s, "W_dec": self.W_dec * s, "b_dec": self.b_dec * s}
        )
        return out.to(self.W_enc.device)

    def save(self, path: str | Path) -> Path:
        """Write `cfg.json` + `sae_weights.safetensors` (SAELens layout) atomically."""
        return save_sae(self, path)

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> "SparseAutoencoder":
        """Read and validate an SAE folder written by latentpatch or SAELens."""
        return load_sae(path, device=device)


def load_sae(path: str | Path, *, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Read and validate an SAE folder (ours or SAELens's); every problem raises `SAEFileError` naming
    the file.

    Sizes and file types are checked before anything is read: a symlink to a device, a FIFO or a
    folder is refused, `cfg.json` may hold at most `sae.files.MAX_CONFIG_BYTES`, and the weights' data is
    read only once the safetensors header, the file size and the shapes `cfg.json` implies agree.

    A file written by latentpatch carries `metadata.latentpatch.weights_sha256` and is verified
    against it. A file without that section is taken as SAELens-written (SAELens records no
    hash): its structure, names, shapes and finiteness are checked, but a corruption of the data
    bytes that leaves the values finite cannot be detected, as safetensors has no checksum.
    """
    cfg, tensors = read_sae_folder(path)
    sae = SparseAutoencoder(cfg, generator=torch.Generator())  # weights overwritten: leave the caller's RNG alone
    sae.load_state_dict({name: t.to(TORCH_DTYPES[cfg.dtype]) for name, t in tensors.items()})
    return sae.to(device)
