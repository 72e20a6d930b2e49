"""Sparse probing (SAEBench's protocol): on a synthetic labelled set where one planted latent carries
the label, the mean-difference choice finds it and its 1-sparse probe is right where the others are
at chance; the choice equals a naive loop; balancing is exact; the collected features equal the
residual and the SAE's encoding read with TransformerLens's own cache; Brown's tags land on the
model's tokens as the corpus text spells the words."""

from __future__ import annotations

import pytest
import torch

from conftest import make_sae
from patching.errors import PatchingError
from patching.splice.probing import (ProbeConfig, ProbeSplit, balanced, collect_probe_features, sparse_probe,
                                     top_latents_by_mean_difference)

PLANTED = 7


def planted_split(n: int, seed: int, d_sae: int = 32, d_in: int = 12) -> ProbeSplit:
    """Latent PLANTED is 1 + noise on positives and noise on negatives (2 positives to 1 negative, so
    balancing matters); every other latent and the residual are noise, except residual dim 3, which
    carries the label weakly."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.rand(n, generator=gen) < 2 / 3
    latents = torch.rand(n, d_sae, generator=gen) * 0.5
    latents[:, PLANTED] += labels.float()
    residual = torch.randn(n, d_in, generator=gen)
    residual[:, 3] += 0.5 * labels.float()
    return ProbeSplit(residual, latents, labels)


def test_planted_latent_is_chosen_first_and_its_probe_is_right():
    config = ProbeConfig(ks=(1, 2, 5), max_per_class=200, min_per_class=10)
    scores = sparse_probe(planted_split(600, 0), planted_split(300, 1), config=config)
    assert scores.top_latents[0] == PLANTED
    assert scores.sae[1] == 1.0 and scores.sae[5] >= 0.98  # separable by the one latent
    assert 0.55 < scores.residual < 0.85  # the residual carries the label only weakly
    assert scores.n_train == 2 * 200 and scores.n_test == 2 * 100  # balanced, capped
    assert scores.to_dict()["sae_top_1"] == 1.0


def test_a_probe_without_the_planted_latent_is_at_chance():
    train, test = planted_split(600, 2), planted_split(400, 3)
    drop = [i for i in range(train.latents.shape[1]) if i != PLANTED]
    scores = sparse_probe(train._replace(latents=train.latents[:, drop]), test._replace(latents=test.latents[:, drop]),
                          ks=(1, 5), max_per_class=200, min_per_class=10)
    assert all(0.35 < acc < 0.65 for acc in scores.sae.values()), scores.sae


def test_mean_difference_choice_equals_a_naive_loop():
    split = planted_split(200, 4)
    naive = []
    for j in range(split.latents.shape[1]):
        pos = [float(split.latents[i, j]) for i in range(200) if split.labels[i]]
        neg = [float(split.latents[i, j]) for i in range(200) if not split.labels[i]]
        naive.append((-abs(sum(pos) / len(pos) - sum(neg) / len(neg)), j))
    assert top_latents_by_mean_difference(split.latents, split.labels, 10) == [j for _, j in sorted(naive)[:10]]


def test_balanced_takes_equal_classes_without_replacement():
    labels = torch.tensor([True] * 30 + [False] * 8)
    idx = balanced(labels, 100, torch.Generator().manual_seed(0))
    assert len(idx) == 16 and int(labels[idx].sum()) == 8 and len(set(idx.tolist())) == 16
    assert len(balanced(labels, 5, torch.Generator().manual_seed(0))) == 10


@pytest.mark.parametrize("bad, message", [
    ({"ks": ()}, "ks"), ({"ks": (0,)}, "ks"), ({"max_per_class": 0}, "max_per_class"),
    ({"min_per_class": 600}, "min_per_class"), ({"inverse_regularization": 0.0}, "inverse_regularization"),
])
def test_config_refuses_bad_values(bad, message):
    with pytest.raises(PatchingError, match=message):
        ProbeConfig(**bad)


def test_too_few_examples_or_too_many_latents_are_refused():
    with pytest.raises(PatchingError, match="smaller class"):
        sparse_probe(planted_split(20, 0), planted_split(20, 1), min_per_class=10, max_per_class=100)
    with pytest.raises(PatchingError, match="more latents than the SAE has"):
        sparse_probe(planted_split(200, 0), planted_split(200, 1), ks=(64,), min_per_class=5)


def test_collected_features_equal_the_cache_and_the_sae(tiny_model, tiny_sae):
    site = tiny_sae.cfg.hook_name
    tokens = torch.randint(1, tiny_model.cfg.d_vocab, (5, 9), generator=torch.Generator().manual_seed(0))
    positions = [[1, 4], [8], [2, 3, 5], [1], [7, 6]]
    features = collect_probe_features(tiny_model, tiny_sae, tokens, positions, batch_size=2)
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(tokens, names_filter=site)
        x = cache[site]
        z = tiny_sae.encode(x)
    rows = [r for r, ps in enumerate(positions) for _ in ps]
    cols = [p for ps in positions for p in ps]
    torch.testing.assert_close(features.token_residual, x[rows, cols], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features.token_latents, z[rows, cols], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features.row_residual, x[:, 1:].mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features.row_latents, z[:, 1:].mean(1), atol=1e-5, rtol=1e-5)
    with pytest.raises(PatchingError, match="positions must lie"):
        collect_probe_features(tiny_model, tiny_sae, tokens, [[0]] * 5)


def test_other_sae_widths_are_read_whole(tiny_model):
    sae = make_sae(tiny_model.cfg.d_model, 24, hook_name="blocks.0.hook_resid_pre", model_name=tiny_model.cfg.model_name)
    tokens = torch.randint(1, tiny_model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(1))
    features = collect_probe_features(tiny_model, sae, tokens, [[1], [2]])
    assert features.token_latents.shape == (2, 24) and features.row_residual.shape == (2, tiny_model.cfg.d_model)


# --- Brown: tags on tokens, and the whole run on a planted toy ------------------------------------

NOUNS = [f"w{i}" for i in range(10, 20)]
OTHERS = [f"w{i}" for i in range(20, 40)]


def _toy_documents(seed: int, n_docs: int, genres=("news", "learned")):
    """Tagged documents of worded-model words: nouns (`nn`) and other words (`vb`, `jj`, `at`) at random."""
    from training.data.brown_tags import TaggedDocument

    gen = torch.Generator().manual_seed(seed)
    docs = []
    for d in range(n_docs):
        text, spans = [], []
        for _ in range(40):
            noun = bool(torch.rand(1, generator=gen) < 0.4)
            pool = NOUNS if noun else OTHERS
            word = pool[int(torch.randint(len(pool), (1,), generator=gen))]
            start = sum(len(t) + 1 for t in text)
            text.append(word)
            spans.append((start, start + len(word), "nn" if noun else ("vb", "jj", "at")[int(word[1:]) % 3]))
        docs.append(TaggedDocument(f"toy/{seed}-{d}", genres[d % len(genres)], " ".join(text), tuple(spans)))
    return docs


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A worded model whose layer-0 residual is the token embedding (rotary positions), with embedding
    dim 0 = +1 on nouns and -1 elsewhere, and an SAE whose latent 0 reads dim 0 ten times as
    strongly as any random latent reads anything: it fires on nouns only."""
    from worded_model import worded_model

    model = worded_model(tmp_path_factory.mktemp("tokenizer"), n_ctx=32)
    vocab = model.tokenizer.get_vocab()
    with torch.no_grad():
        model.W_E[:, 0] = -1.0
        model.W_E[[vocab[w] for w in NOUNS], 0] = 1.0
    sae = make_sae(model.cfg.d_model, 24, hook_name="blocks.0.hook_resid_pre", model_name=model.cfg.model_name, seed=3)
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.W_enc[:, 0] = 0.0
        sae.W_enc[0, 0] = 10.0
        sae.b_enc[0] = 0.0
    return model, sae


def test_brown_run_finds_the_planted_noun_latent(planted):
    from training.activations.probing import brown_probing

    model, sae = planted
    documents = (_toy_documents(0, 12), _toy_documents(1, 6))
    result = brown_probing(model, sae, documents=documents, pos_classes=("noun", "verb"), genres=("news",),
                           context_size=16, test_windows_per_document=2, max_train_tokens=300, max_test_tokens=150)
    noun = result.tasks["pos/noun"]
    assert noun["top_latents"][0] == 0 and noun["sae_top_1"] == 1.0 and noun["residual"] == 1.0
    assert set(result.tasks) == {"pos/noun", "pos/verb", "genre/news"}
    assert result.tasks["genre/news"]["n_test"] == 2 * 6  # 12 held-out windows, half of them news
    assert result.registry_block()["mean"]["residual"] == pytest.approx(
        sum(t["residual"] for t in result.tasks.values()) / 3)


def test_token_tags_take_the_word_each_token_ends():
    from training.data.brown_tags import token_tags

    words = ((0, 5, "np"), (6, 12, "vbd"), (12, 13, "."))  # "Emory called."
    offsets = [(0, 2), (2, 5), (5, 12), (12, 13), (0, 13)]  # Em|ory| called|.|(one token over all three)
    assert token_tags(offsets, words) == [None, "np", "vbd", ".", None]


def test_pos_classes_read_brown_base_tags():
    from training.data.brown_tags import base_tag, pos_class

    assert [base_tag(t) for t in ("nn-tl", "np+bez", "fw-nn", "NNS$")] == ["nn", "np", "fw", "nns$"]
    assert [pos_class(t) for t in ("nns-hl", "vbd", "jjt", "in-tl", "at", "fw-nn")] == \
        ["noun", "verb", "adjective", "preposition", None, None]


def test_tagged_brown_text_is_the_corpus_text_and_tags_spell_their_words(tmp_path):
    """On a packed Brown-layout archive: the tagged document's text equals `brown_documents`' text,
    and each word's span holds the word as the corpus spells it (quotes straightened)."""
    from training.data.brown_tags import tagged_document
    from training.data.real import brown_paragraphs

    raw = ("\n\n\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd ``/`` no/at evidence/nn ''/'' "
           "Jr./np ./. \n\tIt's/pps+bez 1/2/cd done/vbn ,/, (/( he/pps said/vbd )/) ./.\n")
    doc = tagged_document("brown/ca01", "news", raw)
    assert doc.text == "\n\n".join(brown_paragraphs(raw))
    spelled = [(doc.text[s:e], tag) for s, e, tag in doc.words]
    assert spelled[:6] == [("The", "at"), ("Fulton", "np-tl"), ("County", "nn-tl"), ("Grand", "jj-tl"),
                           ("Jury", "nn-tl"), ("said", "vbd")]
    assert ('"', "``") in spelled and ("Jr.", "np") in spelled and ("1/2", "cd") in spelled
    assert (".", ".") not in spelled[:12]  # the abbreviation's doubled period is dropped, as in the text


def test_real_brown_heldout_tags_align_with_the_default_tokenizer(default_model_4l):
    """Every held-out Brown document's tagged text is the corpus's text, and on the default
    tokenizer's windows each tagged token is the end of a word whose tag it carries."""
    from training.data.brown_tags import brown_tagged_documents, labelled_windows
    from training.data.catalog import release_1_documents

    docs = brown_tagged_documents("heldout")
    corpus = {doc.id: doc.text for doc in release_1_documents("brown", "heldout")}
    assert len(docs) == 32 and all(corpus[doc.id] == doc.text for doc in docs)
    windows = labelled_windows(default_model_4l, docs[:3], context_size=64, windows_per_document=2)
    assert windows.tokens.shape == (6, 64) and windows.documents[:2] == [docs[0].id] * 2
    tagged = sum(tag is not None for row in windows.tags for tag in row)
    assert tagged > 0.6 * 6 * 63  # most tokens end a word
    text = docs[0].text
    ends = {end: tag for _start, end, tag in docs[0].words}
    pieces = default_model_4l.to_str_tokens(windows.tokens[0])[1:]
    position = 0
    for piece, tag in zip(pieces, windows.tags[0][1:]):
        position = text.index(piece.strip(), position) + len(piece.strip()) if piece.strip() else position
        if tag is not None:
            assert ends.get(position) == tag, (piece, tag)


def test_documents_per_genre_caps_each_genre_and_bad_settings_are_refused(planted):
    from training.activations.probing import ProbingConfig, brown_probing
    from training.errors import DataSourceError

    model, sae = planted
    documents = (_toy_documents(0, 12), _toy_documents(1, 6))
    result = brown_probing(model, sae, documents=documents, pos_classes=("noun",), genres=(), context_size=16,
                           documents_per_genre=2, probe=ProbeConfig(ks=(1,), min_per_class=3, max_per_class=100))
    assert result.provenance["prompts"]["train"] == ["toy/0-0", "toy/0-1", "toy/0-2", "toy/0-3"]
    for bad in ({"documents_per_genre": 0}, {"pos_classes": ("pronoun",)}, {"context_size": 1}):
        with pytest.raises(DataSourceError):
            ProbingConfig(**bad)
