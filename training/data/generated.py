"""The default corpus: text the default model writes itself, so training needs no network.

The model (SmolLM2-135M-Instruct) continues each prompt of `training.data.prompts` a few times by
sampling; the texts (prompt + continuation) are written once to a JSONL file under the same
cache root as the model (`patching.model.loading.cache_root()/corpora`), named by a hash of the
prompts and the `CorpusConfig`, so the same config always gives the same file and a different
one never reuses it. Generation is seeded per batch: rebuilding gives the same text on the
same machine and library versions.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from patching.model.loading import cache_root, default_model_folder
from sae.files import atomic_write
from training.errors import DataSourceError
from training.data.prompts import CHAT_PROMPTS, TEXT_PROMPTS
from training.data.text import TextOpener, file_texts

CORPUS_VERSION = 1


@dataclass(frozen=True)
class CorpusConfig:
    """How the default corpus is generated."""

    seed: int = 0
    """Seed of the sampling; batch b uses seed * 1_000_003 + b."""
    samples_per_prompt: int = 2
    """Continuations sampled per prompt."""
    max_new_tokens: int = 160
    """Tokens generated per continuation (fewer when the model stops)."""
    temperature: float = 0.9
    """Sampling temperature."""
    top_p: float = 0.95
    """Nucleus-sampling mass."""
    batch_size: int = 48
    """Continuations generated together (left-padded). Larger batches use the CPU better: on 2 cores
    64 rows gave 217 tokens/s against 142 for 16; 48 makes the 96 default continuations two batches."""
    n_prompts: int | None = None
    """Use only the first n prompts (chat and text interleaved); None uses all 48."""

    def __post_init__(self) -> None:
        for name in ("samples_per_prompt", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise DataSourceError(f"CorpusConfig.{name} must be a positive int, got {value!r}")
        if not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise DataSourceError(f"CorpusConfig needs temperature > 0 and 0 < top_p <= 1, got "
                                  f"{self.temperature}, {self.top_p}")
        if self.n_prompts is not None and not 0 < self.n_prompts <= len(all_prompts()):
            raise DataSourceError(f"CorpusConfig.n_prompts must be in 1..{len(all_prompts())} or None, got {self.n_prompts}")

    def prompts(self) -> list[tuple[str, str]]:
        prompts = all_prompts()
        return prompts if self.n_prompts is None else prompts[: self.n_prompts]

    def digest(self) -> str:
        """12 hex digits naming this config and its prompts (what the corpus's text depends on)."""
        blob = json.dumps([CORPUS_VERSION, asdict(self), self.prompts()], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def file_name(self) -> str:
        return f"default-v{CORPUS_VERSION}-{self.digest()}.jsonl"


def all_prompts() -> list[tuple[str, str]]:
    """(kind, prompt) pairs, chat and text interleaved so any prefix mixes both."""
    pairs: list[tuple[str, str]] = []
    for chat, text in zip(CHAT_PROMPTS, TEXT_PROMPTS):
        pairs += [("chat", chat), ("text", text)]
    return pairs


def default_corpus(config: CorpusConfig = CorpusConfig(), *, cache_dir: str | Path | None = None) -> Path:
    """Path of the default corpus JSONL, generating it on first use (a few minutes on 2 cores)."""
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "corpora"
    path = folder / config.file_name()
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        build_corpus(config, path)
    return path


def default_texts(config: CorpusConfig = CorpusConfig(), *, cache_dir: str | Path | None = None) -> TextOpener:
    return file_texts(default_corpus(config, cache_dir=cache_dir))


@torch.inference_mode()
def build_corpus(config: CorpusConfig, path: Path) -> dict[str, Any]:
    """Generate the corpus into `path` (atomically) and a `<path>.info.json` with its size and time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    folder = default_model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    jobs = [(i, s, kind, text) for i, (kind, text) in enumerate(config.prompts())
            for s in range(config.samples_per_prompt)]
    lines, n_tokens = [], 0
    n_batches = -(-len(jobs) // config.batch_size)
    progress = tqdm(total=n_batches * config.max_new_tokens, desc="generating the default corpus", unit="token step")
    for b in range(0, len(jobs), config.batch_size):
        batch = jobs[b : b + config.batch_size]
        inputs = [_render(tokenizer, kind, text) for _, _, kind, text in batch]
        encoded = tokenizer(inputs, return_tensors="pt", padding=True, add_special_tokens=False)
        # Hugging Face's generate draws from torch's global RNG and takes no generator: seed it inside
        # fork_rng, which gives the caller's state back afterwards (the texts are unchanged).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed * 1_000_003 + b // config.batch_size)
            out = model.generate(**encoded, do_sample=True, temperature=config.temperature, top_p=config.top_p,
                                 max_new_tokens=config.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 logits_processor=[_Progress(progress)])
        prompt_len = encoded["input_ids"].shape[1]
        for row, (prompt_index, sample, _, _) in enumerate(batch):
            n_pad = int((encoded["attention_mask"][row] == 0).sum())
            generated = _cut_at_eos(out[row][prompt_len:], tokenizer.eos_token_id)
            ids = torch.cat([out[row][n_pad:prompt_len], generated])
            text = tokenizer.decode(ids, skip_special_tokens=False)
            n_tokens += int(ids.numel())
            lines.append(json.dumps({"text": text, "prompt": prompt_index, "sample": sample}))
        progress.update((b // config.batch_size + 1) * config.max_new_tokens - progress.n)  # rows that stopped early
    progress.close()
    atomic_write(path, ("\n".join(lines) + "\n").encode())
    info = {"texts": len(lines), "tokens": n_tokens, "bytes": path.stat().st_size,
            "build_seconds": round(time.perf_counter() - start, 1), "config": asdict(config)}
    atomic_write(path.with_suffix(".info.json"), json.dumps(info, indent=2).encode())
    return info


class _Progress:
    """A logits processor that leaves the logits alone and advances a bar once per generated token."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.bar.update(1)
        return scores


def _render(tokenizer: Any, kind: str, text: str) -> str:
    if kind == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text


def _cut_at_eos(ids: torch.Tensor, eos: int | None) -> torch.Tensor:
    """Keep the text up to and including the first end-of-sequence token the model wrote."""
    if eos is None:
        return ids
    hits = (ids == eos).nonzero()
    return ids if hits.numel() == 0 else ids[: int(hits[0]) + 1]
