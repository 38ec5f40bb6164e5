"""AQ-Map: the alignment quality map and score of G-Refine (Li et al., 2024, section 3.2, eq. 4-8).

For an image and its prompt:

1. The prompt is cleaned and split into phrases with a noun and a parent each (``syntax.py``,
   eq. 4 and Algorithm 1). With ``aq.modifiers = "strip"`` the prompt's style tail ("highly detailed,
   trending on artstation, by greg rutkowski, octane render"; ``modifiers.py``) is set aside first:
   it yields no phrase, so no defect and no map, but it stays in the cleaned prompt, which is scored
   as a whole (clip_score) and is the start of the refinement prompt (5.), so the refiner keeps the
   style.
2. The image's CLIP-Surgery tokens (``surgery.SurgeryEncoder``, (B, 1+HW, D)) are L2-normalised
   over channels (``feature_norm="token"``: over the token axis, as the reference code); each text's feature (template ensemble, ``text_features.py``) minus the redundant
   "" feature gives similarities ``sim = tokens @ (text - redundant)^T`` (eq. 5). The score of a text
   is ``sigmoid(score_scale * sim[CLS])``; its map is its patch column, min-max normalised per image
   and resized to the image's (H, W), at most ``map_max_side`` long (``surgery.tokens_to_maps``,
   ``surgery.map_size``; PQ-Map's ``map_resize``). A flat
   column (no spatial evidence) becomes the constant score of its text instead of min-max's 0/0.
   Texts scored: the whole cleaned prompt (clip_score), every phrase (a_phs) and every phrase's noun
   (a_pns). A phrase without a noun uses its own text as its noun, so a_pns == a_phs for it: it can
   be noun-unmatched (as a whole) but never adjective-unmatched.
3. Defects (paper text of section 3.2, and the reference code):
   - noun unmatched, ``a_pns[j] < a_bound``: the noun is not in the image; it should be drawn where
     its *parent* phrase is, so the parent's noun map ``A_pns[parent(j)]`` is selected (the phrase's
     own noun map when it has no parent).
   - adjective unmatched, ``a_phs[j] < a_pns[j]`` (and the noun matched): the noun is there but
     its modifiers are not; the phrase's own noun map ``A_pns[j]`` is selected (where the noun is).
   Eq. 6 of the paper writes the two cases' maps the other way round (own map for an unmatched noun,
   the ancestor's for an unmatched adjective), which contradicts its own text and Figure 5; we follow
   the text. Both cases use noun maps (A_pns), as eq. 6 and the reference code do.
4. The alignment map A combines the selected maps; **A is high where the image needs refinement**
   and is all zeros when no phrase is unmatched. ``combine="max"``: element-wise maximum (reference
   code). ``combine="product"``: ``A = 1 - prod_j (1 - M_j)``. Eq. 6 starts from A = 1 and multiplies
   maps in; read literally (product of the maps) it would mark the whole image when nothing is wrong
   and shrink to the *intersection* of the defects' regions as defects add up. Reading A = 1 as
   "everything aligned" and each defect as multiplying in ``1 - M_j`` gives the aligned map
   ``prod_j (1 - M_j)``; its complement is our A: a soft union that equals M for a single defect.
5. Emphasised refinement prompt (eq. 7, ``prompt + 0.1 * phs[j]``): the unmatched phrases are
   appended once each, in prompt order, with the weight ``AQConfig.emphasis`` (default 1.1, i.e. the
   paper's +0.1): ``"<cleaned prompt>, (<phrase 1>:1.1), (<phrase 2>:1.1)"``. diffusers pipelines do
   not parse this syntax themselves; the refiner does (``refiner.parse_emphasis``): it scales those
   tokens' embeddings by the weight and restores the embeddings' mean. With ``emphasis = 1`` the
   phrases are appended as plain text. When the text would exceed the 77-token context of the CLIP
   text encoders (which truncate the end), the phrases go in front instead. With no unmatched phrase
   it is the cleaned prompt. The cleaned prompt keeps its modifiers where they were written (a
   generator weighs a prompt's order), so the style tail always reaches the refiner and is never
   itself emphasised (it is never a phrase).
6. Alignment score (eq. 8): ``a = clip_score * prod_j min(a_phs[j] / beta, 1)``.

One surgery forward serves PQ-Map and AQ-Map: ``from_tokens`` takes the tokens an upstream caller
computed; ``score`` runs the forward itself for standalone use.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from grefine_curate.curate.config import AQConfig
from grefine_curate.curate.results import ADJECTIVE_UNMATCHED, NOUN_UNMATCHED, AQResult, PhraseScore
from grefine_curate.curate.surgery import SurgeryEncoder, map_size, preprocess_images, tokens_to_maps
from grefine_curate.curate.syntax import (
    MODIFIER_MODES,
    NOUN_MODES,
    PARENT_MODES,
    ParsedPrompt,
    is_blank,
    load_spacy,
    parse_prompts,
)
from grefine_curate.curate.text_features import TextFeatureCache

COMBINE_MODES = ("max", "product")


def combine_maps(maps: Sequence[np.ndarray], mode: str, size: tuple[int, int]) -> np.ndarray:
    """Selected per-phrase maps (each (H, W) in [0, 1]) -> A (H, W) float32; zeros when none."""
    if not maps:
        return np.zeros(size, dtype=np.float32)
    stack = np.stack(maps).astype(np.float32)  # (k, H, W)
    if mode == "max":
        out = stack.max(axis=0)
    elif mode == "product":
        out = 1.0 - np.prod(1.0 - stack, axis=0)
    else:
        raise ValueError(f"aq.combine={mode!r} is not one of {COMBINE_MODES}")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


FEATURE_NORMS = ("channel", "token")


def _check_config(cfg: AQConfig) -> None:
    if cfg.combine not in COMBINE_MODES:
        raise ValueError(f"aq.combine={cfg.combine!r} is not one of {COMBINE_MODES}")
    if cfg.feature_norm not in FEATURE_NORMS:
        raise ValueError(f"aq.feature_norm={cfg.feature_norm!r} is not one of {FEATURE_NORMS}")
    if not 0.0 < cfg.a_bound < 1.0:
        raise ValueError(f"aq.a_bound={cfg.a_bound} must lie in (0, 1): it bounds a sigmoid score")
    if cfg.beta <= 0:
        raise ValueError(f"aq.beta={cfg.beta} must be positive (eq. 8 divides by it)")
    if cfg.max_phrases < 0:
        raise ValueError(f"aq.max_phrases={cfg.max_phrases} must be >= 0")
    if cfg.score_scale <= 0:
        raise ValueError(f"aq.score_scale={cfg.score_scale} must be positive")
    for name, modes in (("modifiers", MODIFIER_MODES), ("noun", NOUN_MODES), ("parents", PARENT_MODES)):
        if getattr(cfg, name) not in modes:
            raise ValueError(f"aq.{name}={getattr(cfg, name)!r} is not one of {modes}")


class AQMap:
    """Alignment quality of images against their prompts (scores, per-phrase defects, map A).

    ``clip``: a ClipBundle (needed by ``score`` and by the default text cache; ``from_tokens`` with an
    injected ``cache`` needs none). ``cache``: a shared ``TextFeatureCache`` (one per run).
    ``nlp``: a spaCy pipeline (default: ``load_spacy(cfg.spacy_model)`` on first use).
    """

    def __init__(
        self,
        clip: Any = None,
        cfg: AQConfig | None = None,
        cache: TextFeatureCache | None = None,
        *,
        nlp: Any = None,
        image_size: int = 224,
        surgery_blocks: int = 6,
        map_resize: str = "bicubic",
        parse_cache_size: int = 4096,
        encoder: SurgeryEncoder | None = None,  # share PQ-Map's surgery encoder (one forward for both)
        map_max_side: int = 0,  # maps at most this long side (0 = the image's size; surgery.map_size)
    ):
        self.cfg = cfg or AQConfig()
        _check_config(self.cfg)
        if cache is None:
            if clip is None:
                raise ValueError("AQMap needs a ClipBundle `clip` or a TextFeatureCache `cache`")
            cache = TextFeatureCache(clip, self.cfg.templates, self.cfg.text_cache_size)
        self.clip = clip
        self.cache = cache
        self.image_size = image_size
        self.surgery_blocks = surgery_blocks
        self.map_resize = map_resize
        self.map_max_side = int(map_max_side)
        self._nlp = nlp
        self._encoder: SurgeryEncoder | None = encoder
        self._parsed: OrderedDict[str, ParsedPrompt] = OrderedDict()
        self._parse_lock = threading.Lock()
        self._parse_cache_size = parse_cache_size

    @classmethod
    def from_preset(
        cls,
        preset: Any,
        clip: Any = None,
        cache: TextFeatureCache | None = None,
        models_dir: Any = None,
        **kwargs: Any,
    ) -> AQMap:
        """AQ-Map for a Preset (its aq config, CLIP input size and surgery depth); loads CLIP if not given."""
        if clip is None:
            from grefine_curate.curate.clip_models import load_clip

            clip = load_clip(preset.clip, models_dir=models_dir, seed=preset.seed)
        kwargs.setdefault("map_max_side", preset.map_max_side)
        return cls(clip, preset.aq, cache, image_size=preset.clip.image_size,
                   surgery_blocks=preset.clip.surgery_blocks, **kwargs)

    @property
    def nlp(self) -> Any:
        if self._nlp is None:
            self._nlp = load_spacy(self.cfg.spacy_model)
        return self._nlp

    @property
    def encoder(self) -> SurgeryEncoder:
        if self._encoder is None:
            if self.clip is None:
                raise ValueError("AQMap.score needs a ClipBundle; pass `clip` or call from_tokens with tokens")
            self._encoder = SurgeryEncoder(self.clip.model.visual, self.surgery_blocks)
        return self._encoder

    # ---------------------------------------------------------------------------------------------
    # Prompts

    def parse(self, prompts: Sequence[str | ParsedPrompt | None]) -> list[ParsedPrompt | None]:
        """Parse prompts (LRU-cached by text); None for a null, empty or punctuation-only prompt."""
        with self._parse_lock:
            return self._parse(prompts)

    def _parse(self, prompts: Sequence[str | ParsedPrompt | None]) -> list[ParsedPrompt | None]:
        out: list[ParsedPrompt | None] = [None] * len(prompts)
        todo: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            if isinstance(p, ParsedPrompt):
                out[i] = p
            elif p is None or not isinstance(p, str):
                if p is not None:
                    raise ValueError(f"prompt {i} must be a string or None, got {type(p).__name__}")
            elif p in self._parsed:
                self._parsed.move_to_end(p)
                out[i] = self._parsed[p]
            else:
                todo.setdefault(p, []).append(i)
        if todo:
            parsed_all = parse_prompts(list(todo), self.nlp, self.cfg.max_phrases, modifiers=self.cfg.modifiers,
                                       noun=self.cfg.noun, parents=self.cfg.parents)
            for text, parsed in zip(todo, parsed_all):
                self._parsed[text] = parsed
                for i in todo[text]:
                    out[i] = parsed
            while len(self._parsed) > self._parse_cache_size:
                self._parsed.popitem(last=False)
        return [None if p is None or is_blank(p.cleaned) else p for p in out]

    def _token_count(self, text: str) -> int | None:
        encode = getattr(getattr(self.clip, "tokenizer", None), "encode", None)
        return None if encode is None else len(encode(text)) + 2  # + start and end tokens

    def emphasise(self, cleaned: str, unmatched: Sequence[str]) -> str:
        """Refinement prompt of eq. 7 (see the module docstring): unmatched phrases appended, weighted."""
        extra = [p for p in dict.fromkeys(unmatched) if p]
        if not extra:
            return cleaned
        w = float(self.cfg.emphasis)
        # Brackets inside a phrase would break the weight syntax; phrases are cleaned text anyway.
        extra = [p.replace("(", " ").replace(")", " ").strip() for p in extra]
        tail = ", ".join(extra if w == 1.0 else [f"({p}:{w:g})" for p in extra])
        text = f"{cleaned}, {tail}" if cleaned else tail
        count = self._token_count(text)
        if count is not None and count > 77:
            text = f"{tail}, {cleaned}"
        return text

    # ---------------------------------------------------------------------------------------------
    # Scoring

    @torch.inference_mode()
    def from_tokens(
        self,
        tokens: torch.Tensor,
        sizes: Sequence[tuple[int, int]],
        prompts: Sequence[str | ParsedPrompt | None],
        grid: tuple[int, int] | None = None,
    ) -> list[AQResult | None]:
        """AQ results from precomputed surgery tokens (B, 1+HW, D) after ln_post and projection.

        ``sizes``: (H, W) of each image's map (the image's size, or ``map_size``'s reduction of it).
        ``prompts``: text, an already parsed prompt, or None; the result is None where the prompt is
        null or blank.
        """
        # 1. Check inputs
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3:
            raise ValueError(f"tokens must be a tensor (B, 1+HW, D); got {getattr(tokens, 'shape', type(tokens))}")
        b, length, dim = tokens.shape
        if len(sizes) != b or len(prompts) != b:
            raise ValueError(f"got {b} token rows, {len(sizes)} sizes and {len(prompts)} prompts; they must match")
        hw = length - 1
        if grid is None:
            side = int(round(hw**0.5))
            grid = (side, side)
        if grid[0] * grid[1] != hw:
            raise ValueError(f"tokens have {hw} patch tokens, which is not the patch grid {grid}; pass `grid`")

        # 2. Parse prompts and plan the texts of each image: [prompt, phrases..., nouns...]
        parsed = self.parse(prompts)
        plans: list[list[str] | None] = []
        for pp in parsed:
            if pp is None:
                plans.append(None)
                continue
            nouns = [ph.noun or ph.text for ph in pp.phrases]  # a noun-less phrase stands for itself
            plans.append([pp.cleaned] + [ph.text for ph in pp.phrases] + nouns)

        # 3. Text features: one cache call for the union of all texts of the batch
        union = list(dict.fromkeys(t for plan in plans if plan for t in plan))
        if not union:
            return [None] * b
        row = {t: k for k, t in enumerate(union)}
        feats = self.cache.encode(union)  # (U, D) unit norm
        diff = (feats - self.cache.redundant()).to(device=tokens.device, dtype=torch.float32)  # (U, D)
        if diff.shape[1] != dim:
            raise ValueError(f"text features have {diff.shape[1]} channels, image tokens {dim}: different CLIP models?")
        # (B, 1+HW, D): unit norm over channels; "token" = over the token axis, as the reference code
        tok = F.normalize(tokens.float(), dim=-1 if self.cfg.feature_norm == "channel" else 1)

        # 4. Per image: similarities, scores, defects, map A, score a
        results: list[AQResult | None] = []
        for i, (pp, plan) in enumerate(zip(parsed, plans)):
            if plan is None:
                results.append(None)
                continue
            # One column per distinct text, then gathered: a phrase that is its own noun ("tower")
            # gets bit-identical a_phs and a_pns (GEMM rounding differs across columns, which would
            # otherwise decide "adjective unmatched" by float noise).
            uniq = list(dict.fromkeys(plan))
            idx = torch.tensor([row[t] for t in uniq], device=tok.device)
            pos = {t: k for k, t in enumerate(uniq)}
            sims = (tok[i] @ diff[idx].T)[:, [pos[t] for t in plan]]  # (1+HW, T_i)
            scores = torch.sigmoid(self.cfg.score_scale * sims[0]).tolist()  # (T_i,)
            results.append(self._result(pp, scores, sims[1:], grid, sizes[i]))
        return results

    def _result(self, pp: ParsedPrompt, scores: list[float], patch_sims: torch.Tensor,
                grid: tuple[int, int], size: tuple[int, int]) -> AQResult:
        n = len(pp.phrases)
        clip_score, a_phs, a_pns = scores[0], scores[1 : 1 + n], scores[1 + n :]
        noun_col = [1 + n + j for j in range(n)]  # text column of phrase j's noun (0 = prompt, 1..n = phrases)
        phrases, selected, unmatched = [], [], []
        for j, ph in enumerate(pp.phrases):
            defect = None
            if a_pns[j] < self.cfg.a_bound:  # noun unmatched: draw it where its parent is
                defect = NOUN_UNMATCHED
                selected.append(noun_col[ph.parent])
            elif a_phs[j] < a_pns[j]:  # adjective unmatched: the noun is there, its modifiers are not
                defect = ADJECTIVE_UNMATCHED
                selected.append(noun_col[j])
            if defect is not None:
                unmatched.append(ph.text)
            phrases.append(PhraseScore(text=ph.text, noun=ph.noun, parent=ph.parent,
                                       a_pns=float(a_pns[j]), a_phs=float(a_phs[j]), defect=defect))
        h, w = int(size[0]), int(size[1])
        cols = list(dict.fromkeys(selected))
        maps = []
        if cols:
            column = patch_sims[:, cols].T  # (k, HW)
            # a flat column has no location: it becomes its text's own score (how present it is overall)
            maps = tokens_to_maps(column, grid, [(h, w)] * len(cols), self.map_resize,
                                  flat_fill=[scores[c] for c in cols])
        A = combine_maps(maps, self.cfg.combine, (h, w))  # (H, W), high = needs refinement
        cask = float(np.prod([min(s / self.cfg.beta, 1.0) for s in a_phs])) if a_phs else 1.0
        return AQResult(
            a=float(clip_score * cask),  # eq. 8
            clip_score=float(clip_score),
            A=A,
            phrases=phrases,
            emphasised_prompt=self.emphasise(pp.cleaned, unmatched),
        )

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB images -> surgery tokens (B, 1+HW, D): the one forward PQ-Map and AQ-Map can share."""
        pixels = preprocess_images(images, self.image_size, self.clip.mean, self.clip.std,
                                   self.clip.device, self.clip.dtype)  # (B, 3, S, S)
        with torch.inference_mode():
            return self.encoder(pixels)

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str | ParsedPrompt | None]
    ) -> list[AQResult | None]:
        """Standalone AQ-Map: one surgery forward over ``images``, then ``from_tokens``."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images and {len(prompts)} prompts; they must match")
        if not images:
            return []
        tokens = self.encode_images(images)
        return self.from_tokens(tokens, [map_size(img.height, img.width, self.map_max_side) for img in images],
                                prompts)
