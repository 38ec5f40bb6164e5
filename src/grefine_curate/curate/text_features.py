"""CLIP text features for AQ-Map: a prompt-template ensemble, the "" redundant feature, one shared LRU cache.

G-Refine (section 3.2, eq. 5) scores each phrase against the image with CLIP-Surgery's text side
(Li et al., 2023): every text is embedded with a template ensemble -- each template's embedding is
L2-normalised, the embeddings are averaged and the mean is renormalised -- and the empty string ""
embedded the same way is the *redundant* feature that is subtracted from every text feature.

Phrases repeat across a data set ("blue eyes", "long hair", "a cat"), so features are cached by
text in one LRU shared by the whole run: a phrase is encoded once. All texts of one ``encode`` call
that are not cached go through the text encoder together (chunked only to bound memory).

The encoder forward itself is trimmed to the longest tokenised text of the batch: CLIP's text
transformer is causal, so the outputs up to the end-of-text token do not depend on the padding after
it, and the result equals ``model.encode_text`` on the full 77-token context (checked by a test).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

# CLIP-Surgery's 85 ImageNet templates (clip.encode_text_with_prompt_ensemble).
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.", "there is a {} in the scene.",
    "there is the {} in the scene.", "this is a {} in the scene.", "this is the {} in the scene.",
    "this is one {} in the scene.",
)
assert len(IMAGENET_TEMPLATES) == 85, "CLIP-Surgery's ImageNet ensemble has 85 templates"
SINGLE_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
TEMPLATE_SETS = {"imagenet": IMAGENET_TEMPLATES, "single": SINGLE_TEMPLATES}


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ValueError(f"aq.templates={templates!r} is not one of {sorted(TEMPLATE_SETS)}")
        return TEMPLATE_SETS[templates]
    out = tuple(templates)
    if not out or any("{}" not in t for t in out):
        raise ValueError("custom templates must be a non-empty list of strings that each contain '{}'")
    return out


def _trimmed_encode_text(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` with the context cut after the last end-of-text token of the batch.

    Exact for open_clip's causal CLIP text tower with argmax (end-of-text) pooling; any other text
    tower goes through ``encode_text`` unchanged.
    """
    mask = getattr(model, "attn_mask", None)
    if mask is None or getattr(model, "text_pool_type", None) != "argmax" or not hasattr(model, "token_embedding"):
        return model.encode_text(tokens)
    length = int(tokens.argmax(dim=-1).max().item()) + 1  # end-of-text has the largest id
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)  # (N, L, W)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # (N, W) at end-of-text
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x  # (N, D)


class TextFeatureCache:
    """L2-normalised, template-ensembled CLIP text features, cached by text (LRU), thread-safe.

    Either ``clip`` (a ClipBundle: ``model.encode_text`` + ``tokenizer``) or ``encoder`` (a function
    texts -> (N, D) features, used as is, without templates; tests inject one to set similarities).
    ``hits``/``misses`` count texts, ``forwards`` counts calls of the text encoder.
    """

    def __init__(
        self,
        clip: Any = None,
        templates: str | Sequence[str] = "imagenet",
        maxsize: int = 65536,
        encoder: Callable[[list[str]], torch.Tensor] | None = None,
        batch_size: int = 1024,  # sequences per text-encoder forward (bounds memory)
    ):
        if (clip is None) == (encoder is None):
            raise ValueError(
                "TextFeatureCache needs exactly one of `clip` (a ClipBundle) or `encoder` (texts -> (N, D))"
            )
        if maxsize < 1:
            raise ValueError(f"text_cache_size={maxsize} must be at least 1")
        self.clip = clip
        self.encoder = encoder
        self.templates = resolve_templates(templates)
        self.maxsize = maxsize
        self.batch_size = max(batch_size, len(self.templates))
        self.device = clip.device if clip is not None else None
        self._lru: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._redundant: torch.Tensor | None = None
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0
        self.forwards = 0

    def __len__(self) -> int:
        return len(self._lru)

    def stats(self) -> dict[str, int]:
        return {"size": len(self._lru), "hits": self.hits, "misses": self.misses, "forwards": self.forwards}

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()
            self._redundant = None

    @torch.inference_mode()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        """Uncached texts -> (N, D) float32 ensembled features, unit norm."""
        if self.encoder is not None:
            self.forwards += 1
            feats = torch.as_tensor(self.encoder(list(texts))).float()  # (N, D)
            assert feats.ndim == 2 and feats.shape[0] == len(texts), "injected encoder must return (N, D)"
            return F.normalize(feats, dim=-1)
        model, tokenizer = self.clip.model, self.clip.tokenizer
        n_t = len(self.templates)
        # Shortest texts first, so a chunk's trimmed context is not set by one long prompt.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        texts_per_chunk = max(1, self.batch_size // n_t)
        out = torch.empty(0)
        for start in range(0, len(order), texts_per_chunk):
            idx = order[start : start + texts_per_chunk]
            prompts = [tpl.format(texts[i]) for i in idx for tpl in self.templates]  # text-major (n * T)
            tokens = tokenizer(prompts).to(self.clip.device)  # (n * T, 77)
            self.forwards += 1
            emb = _trimmed_encode_text(model, tokens).float()  # (n * T, D)
            emb = F.normalize(emb, dim=-1).reshape(len(idx), n_t, emb.shape[-1])  # (n, T, D)
            feats = F.normalize(emb.mean(dim=1), dim=-1)  # (n, D) ensemble: average, renormalise
            if out.numel() == 0:
                out = feats.new_empty(len(texts), feats.shape[-1])
            out[torch.tensor(idx, device=out.device)] = feats
        return out

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """texts -> (N, D) float32 unit-norm features (one forward for all texts not yet cached)."""
        texts = list(texts)
        with self._lock:
            todo = list(dict.fromkeys(t for t in texts if t not in self._lru))
            self.misses += len(todo)
            self.hits += len(texts) - sum(1 for t in texts if t in todo)
            fresh = self._embed(todo) if todo else None
            found: dict[str, torch.Tensor] = {}
            for t in texts:
                if t in self._lru:
                    self._lru.move_to_end(t)
                    found[t] = self._lru[t]
            if fresh is not None:
                for t, f in zip(todo, fresh):
                    found[t] = f
                    self._lru[t] = f
                while len(self._lru) > self.maxsize:
                    self._lru.popitem(last=False)
            if not texts:
                return torch.empty(0, 0)
            return torch.stack([found[t] for t in texts])  # (N, D)

    def redundant(self) -> torch.Tensor:
        """The empty string "" through the same ensemble: (D,), unit norm, kept outside the LRU."""
        with self._lock:
            if self._redundant is None:
                self._redundant = self._embed([""])[0]
            return self._redundant
