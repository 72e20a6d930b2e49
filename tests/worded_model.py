"""A tiny random model with a word-level tokenizer built on the spot (no download): the words
`w0..w46` are token ids 3..49 (BOS 0, EOS 1, UNK 2), one token per word, so texts of any token
length are easy to write. Shared by the reliability tests."""

from __future__ import annotations

from pathlib import Path


def worded_model(folder: Path, **overrides):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens import HookedTransformer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from patching.model import tl_compat

    words = ["<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(47)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # TransformerLens reloads the tokenizer from its folder (to add BOS), so it must live in one.
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                            pad_token="<eos>").save_pretrained(folder)
    cfg = tl_compat.tiny_config(**{"n_layers": 2, "d_vocab": 50, "n_ctx": 16, "positional_embedding_type": "rotary",
                                   **overrides})
    model = HookedTransformer(cfg, AutoTokenizer.from_pretrained(folder))
    model.eval()
    return model
