"""The balanced refiner of G-Refine (Li et al. 2024, section 3.3, eq. 9-10), for batches.

Per item: a route from the scores (``routing.choose_route``), the low-quality mask from the maps
(``masks.build_mask_pair``: Bi(1 - P + A), dilated and feathered), then

    stage 1  inpaint the mask with the refinement (emphasised) prompt at a strength that falls as
             quality rises (``masks.stage1_strength``), n1 denoising steps; the refined pixels are
             pasted back through the feathered mask, so pixels outside the mask stay as they were
    stage 2  a global low-strength img2img pass at delta, n2 denoising steps

``full`` runs both stages, ``light`` stage 2 only, ``skip`` no diffusion (the same image object
comes back). A ``full`` item whose mask is empty runs as ``light``. n1 and n2 are exact: the
``num_inference_steps`` passed to diffusers is chosen so that its strength rule runs n1 (n2) steps
(``masks.split_steps``), and the steps actually run are counted with ``callback_on_step_end``.

No-regression guard (beyond the paper, on by default): the refined image is re-scored with the
injected ``rescore(images, prompts) -> [(p, a)]`` (the same PQ/AQ models); when p drops by more
than ``guard_tolerance`` or a drops by more than ``guard_tolerance``, the original is kept and
the route is ``reverted``, with the scores of the rejected refinement in p_after / a_after.

Sizes: diffusion runs at the model's resolution: long side = ``refiner.resolution``, aspect kept,
both sides rounded to multiples of 8 (Lanczos resize, up or down). The stage-1 paste-back happens
at that size; the final image is resized back to the original (W, H) with Lanczos. Stage 2 is
global, so on route light/full every pixel passes through the model resolution: an image much
larger than it comes back softer (refining at native size would need tiling, not done here).
The maps may be a reduction of the image (``Preset.map_max_side``): masks are built at their size
and resized to the processing size like full-size ones. A caller holding many large images may pass
``refine_input(image)`` (the processing-size reduction) with ``output_size`` = the original's (W, H)
and drop the original: the result is the same; skip and reverted then return the reduced image.

Batches: items are grouped by processed size and stage-1 ``num_inference_steps`` (stage 2 by size)
and each group runs as one pipeline call with per-item prompts and per-item ``torch.Generator``s.
Items with the same size and steps behave identically whatever their nominal strengths, because
diffusers uses the strength only through int(num_inference_steps * strength).

Determinism: an item's seed comes from ``item_seed(global_seed, item_id)`` (SHA-256, stable across
processes, unlike Python's ``hash``); each stage draws its noise from a CPU generator seeded from
it, so the same input and seed give the same pixels on the same device and software.

Refinement prompts (paper eq. 7) are passed as text; weighted phrases in the usual ``(phrase:1.1)``
syntax are honoured, not tokenised literally: the weight scales the phrase's token embeddings,
which are then rescaled to their original mean (the common prompt-weighting rule; the pooled
embedding is the plain prompt's). Prompts without that syntax (AQ-Map's "prompt, phrase" form) pass
through unchanged. The guard re-scores with ``score_prompt`` (the original prompt), else with the
refinement prompt stripped of weights.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from grefine_curate.curate.config import RefinerConfig, RoutingConfig
from grefine_curate.curate.errors import ConfigError
from grefine_curate.curate.masks import (MaskPair, StepPlan, build_mask_pair, check_strength_bounds,
                                         split_steps, stage1_strength)
from grefine_curate.curate.routing import ROUTES, check_routing, choose_route
from grefine_curate.curate.surgery import map_size

log = logging.getLogger(__name__)

OUTCOME_ROUTES = ("skip", "light", "full", "reverted")
Rescore = Callable[[list[Image.Image], list[str | None]], Sequence[tuple[float, float | None]]]


def item_seed(global_seed: int, item_id: Any) -> int:
    """A stable per-item seed in [0, 2**63) from the global seed and the item's id."""
    digest = hashlib.sha256(f"{int(global_seed)}\x1f{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _stage_generator(seed: int, stage: int) -> torch.Generator:
    # CPU generators: the noise is the same whatever device the pipeline runs on.
    return torch.Generator("cpu").manual_seed(item_seed(seed, f"stage{stage}"))


@dataclass
class RefineItem:
    image: Image.Image  # RGB, any size (or already reduced by ``refine_input``: then give output_size)
    prompt: str | None  # refinement prompt (AQ's emphasised prompt, eq. 7); None = no prompt
    p: float  # perceptual quality score, eq. 3 (high = good)
    a: float | None  # alignment score, eq. 8 (high = good); None without a prompt
    # Maps at the image's (H, W), or a reduction of it with the same aspect (Preset.map_max_side)
    P: np.ndarray  # (h, w) float32 in [0, 1], high = good
    A: np.ndarray | None  # (h, w) as P, in [0, 1], high = needs refinement; None without a prompt
    seed: int  # from item_seed(global seed, item id)
    route: str | None = None  # precomputed route; None = chosen from p and a
    score_prompt: str | None = None  # prompt the guard re-scores with; None = `prompt` without emphasis
    output_size: tuple[int, int] | None = None  # (W, H) of the original image when `image` was reduced

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) of the original image: what the maps describe and the result comes back at."""
        return tuple(self.output_size) if self.output_size is not None else self.image.size


@dataclass
class RefineOutcome:
    image: Image.Image  # result at the original size (the input object itself on skip / reverted)
    route: str  # "skip" | "light" | "full" | "reverted"
    mask_area: float  # fraction of the image covered by the (dilated) low-quality mask
    p_after: float | None  # score of the refined image (None when skipped or when the guard is off)
    a_after: float | None
    steps_run: dict[str, int]  # denoising steps actually run: {"stage1": n1, "stage2": n2}
    mask: np.ndarray | None  # (h, w) bool low-quality mask at the maps' size (what stage 1 inpaints on route full)
    p_before: float = 0.0
    a_before: float | None = None
    strength1: float | None = None  # effective stage-1 strength n1 / num_inference_steps (route full)


# --------------------------------------------------------------------------------------------- #
# Helpers: sizes, tensors, weighted prompts
# --------------------------------------------------------------------------------------------- #


def processing_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(w, h) at which diffusion runs: long side = resolution, aspect kept, multiples of 8."""
    scale = resolution / max(width, height)
    return (max(8, int(round(width * scale / 8)) * 8), max(8, int(round(height * scale / 8)) * 8))


def refine_input(image: Image.Image, resolution: int) -> Image.Image:
    """The image the refiner starts from: reduced to its processing size when larger (Lanczos, as
    ``refine`` itself does), else unchanged. A caller that holds many large images passes this with
    ``RefineItem.output_size`` = the original's size and drops the original: the result is identical."""
    size = processing_size(*image.size, resolution)
    return image.resize(size, Image.LANCZOS) if size[0] * size[1] < image.width * image.height else image


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0  # (3, h, w)


def _to_pil(t: torch.Tensor) -> Image.Image:
    arr = (t.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB")


def _resize_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a float (H, W) map to (w, h) = size with PIL (antialiased when shrinking)."""
    if (m.shape[1], m.shape[0]) == size:
        return m.astype(np.float32, copy=False)
    return np.array(Image.fromarray(m.astype(np.float32), "F").resize(size, Image.BILINEAR), dtype=np.float32)


_EMPHASIS = re.compile(r"\(([^()]+?):\s*([0-9]*\.?[0-9]+)\s*\)")


def parse_emphasis(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Split "a (red hat:1.1) on" into the plain prompt and weighted segments."""
    segments: list[tuple[str, float]] = []
    pos = 0
    for m in _EMPHASIS.finditer(prompt):
        if m.start() > pos:
            segments.append((prompt[pos:m.start()], 1.0))
        segments.append((m.group(1), float(m.group(2))))
        pos = m.end()
    if pos < len(prompt):
        segments.append((prompt[pos:], 1.0))
    return "".join(s for s, _ in segments), segments


def token_weights(tokenizer: Any, segments: list[tuple[str, float]]) -> torch.Tensor | None:
    """(L,) per-token weights aligned with ``tokenizer(plain prompt)``, or None when all are 1."""
    if all(w == 1.0 for _, w in segments):
        return None
    plain = "".join(s for s, _ in segments)
    full = tokenizer(plain, add_special_tokens=True).input_ids
    ids: list[int] = [full[0]]
    weights: list[float] = [1.0]
    for text, w in segments:
        seg = tokenizer(text, add_special_tokens=False).input_ids
        ids += seg
        weights += [w] * len(seg)
    ids.append(full[-1])
    weights.append(1.0)
    if ids != full:  # a segment boundary split a word differently: do not guess
        log.debug("emphasis ignored: segment tokens do not line up with the prompt's")
        return None
    L = tokenizer.model_max_length
    weights = (weights + [1.0] * L)[:L]
    return torch.tensor(weights, dtype=torch.float32)


def _apply_weights(embeds: torch.Tensor, weights: list[torch.Tensor | None]) -> torch.Tensor:
    """Scale token embeddings (B, L, D) by per-token weights, keeping each item's mean."""
    if all(w is None for w in weights):
        return embeds
    out = embeds.clone()
    for i, w in enumerate(weights):
        if w is None:
            continue
        w = w[: embeds.shape[1]].to(embeds.device, embeds.dtype)
        before = embeds[i].float().mean()
        scaled = embeds[i] * w[:, None]  # (L, D)
        out[i] = scaled * (before / scaled.float().mean()).to(embeds.dtype)
    return out


def _is_sdxl(pipe: Any) -> bool:
    return hasattr(pipe, "text_encoder_2")


def encode_refinement_prompts(pipe: Any, prompts: list[str | None], guidance_scale: float) -> dict[str, torch.Tensor]:
    """Prompt embeddings (with emphasis weights) as keyword arguments of the pipeline's ``__call__``."""
    parsed = [parse_emphasis(p or "") for p in prompts]
    plain = [pl for pl, _ in parsed]
    tokenizer = pipe.tokenizer if getattr(pipe, "tokenizer", None) is not None else pipe.tokenizer_2
    weights = [token_weights(tokenizer, segs) for _, segs in parsed]
    device = pipe._execution_device
    do_cfg = guidance_scale > 1.0
    if _is_sdxl(pipe):
        pe, npe, ppe, nppe = pipe.encode_prompt(prompt=plain, device=device, num_images_per_prompt=1,
                                                do_classifier_free_guidance=do_cfg)
        kwargs = {"prompt_embeds": _apply_weights(pe, weights), "pooled_prompt_embeds": ppe}
        if do_cfg:
            kwargs.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=nppe)
        return kwargs
    pe, npe = pipe.encode_prompt(plain, device, 1, do_cfg)
    kwargs = {"prompt_embeds": _apply_weights(pe, weights)}
    if do_cfg:
        kwargs["negative_prompt_embeds"] = npe
    return kwargs


class _StepCounter:
    """``callback_on_step_end`` that counts the denoising steps a pipeline call really runs."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        self.n += 1
        return {}


# --------------------------------------------------------------------------------------------- #
# The refiner
# --------------------------------------------------------------------------------------------- #


@dataclass
class _Work:
    """Per-item state between the steps of ``refine``."""

    index: int
    route: str
    masks: MaskPair
    size: tuple[int, int]  # (w, h) at which diffusion runs
    plan: StepPlan
    strength1: float
    current: torch.Tensor | None = None  # (3, h, w) in [0, 1], processing size: after the stages run so far
    steps_run: dict[str, int] = field(default_factory=lambda: {"stage1": 0, "stage2": 0})


class BalancedRefiner:
    """Two-stage map-guided refinement (module docstring) of a batch of ``RefineItem``s."""

    def __init__(
        self,
        cfg: RefinerConfig,
        routing: RoutingConfig,
        pipelines: tuple[Any, Any] | None = None,
        rescore: Rescore | None = None,
        models_dir: str | None = None,
        device: str | torch.device | None = None,
        max_batch: int = 8,
    ):
        check_routing(routing)
        check_strength_bounds(cfg)
        if cfg.resolution < 8 or cfg.resolution % 8:
            raise ConfigError(f"refiner.resolution must be a positive multiple of 8, got {cfg.resolution}")
        split_steps(cfg.steps, cfg.stage1_fraction, cfg.strength_max, cfg.delta)  # validates steps/fraction
        if cfg.guard and rescore is None:
            raise ValueError(
                "the no-regression guard is on (refiner.guard = true) but no `rescore` callable was given: "
                "pass rescore=scorer.rescore, or set refiner.guard = false"
            )
        if cfg.guard_tolerance < 0:
            raise ConfigError(f"refiner.guard_tolerance must be >= 0, got {cfg.guard_tolerance}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.cfg = cfg
        self.routing = routing
        self.rescore = rescore
        self.models_dir = models_dir
        self.device = device
        self.max_batch = max_batch
        if pipelines is not None:  # given pipelines get the same exact-step scheduler check as loaded ones
            from grefine_curate.curate.diffusion_models import ensure_exact_step_scheduler

            for pipe in pipelines:
                ensure_exact_step_scheduler(pipe)
        self._pipes = pipelines

    @property
    def pipelines(self) -> tuple[Any, Any]:
        """(stage 1, stage 2), loaded on first use so that an all-skip batch loads no model."""
        if self._pipes is None:
            from grefine_curate.curate.diffusion_models import load_refiner_pipelines

            self._pipes = load_refiner_pipelines(self.cfg, self.models_dir, self.device)
        return self._pipes

    # ------------------------------------------------------------------------------------------- #
    def check_inputs(self, items: Sequence[RefineItem]) -> None:
        for i, it in enumerate(items):
            where = f"item {i}"
            if not isinstance(it, RefineItem):
                raise ValueError(f"{where}: expected a RefineItem, got {type(it).__name__}")
            if not isinstance(it.image, Image.Image) or it.image.mode != "RGB":
                got = it.image.mode if isinstance(it.image, Image.Image) else type(it.image).__name__
                raise ValueError(f"{where}: image must be an RGB PIL image (decode with images.decode_image), "
                                 f"got {got}")
            if it.output_size is not None and (len(it.output_size) != 2 or min(it.output_size) < 1):
                raise ValueError(f"{where}: output_size must be (W, H) of the original image, got {it.output_size!r}")
            w, h = it.size
            for name, m in (("P", it.P), ("A", it.A)):
                if m is None and name == "P":
                    raise ValueError(f"{where}: P (the PQ map) is required")
                if m is None:
                    continue
                shape = np.shape(m)
                if len(shape) != 2 or map_size(h, w, max(shape)) != shape:
                    raise ValueError(f"{where}: {name} has shape {shape}, expected the image's (H, W) = ({h}, {w}) "
                                     f"or a reduction of it with the same aspect (surgery.map_size)")
                if name == "A" and shape != np.shape(it.P):
                    raise ValueError(f"{where}: A has shape {shape} but P has {np.shape(it.P)}; both maps must be "
                                     "at one size")
            if it.prompt is not None and not isinstance(it.prompt, str):
                raise ValueError(f"{where}: prompt must be a string or None, got {type(it.prompt).__name__}")
            if isinstance(it.seed, bool) or not isinstance(it.seed, (int, np.integer)) or not 0 <= it.seed < 2**64:
                raise ValueError(f"{where}: seed must be an integer in [0, 2**64), got {it.seed!r} (use item_seed)")
            if it.route is not None and it.route not in ROUTES:
                raise ValueError(f"{where}: route {it.route!r} is not one of {', '.join(ROUTES)} (or None)")
            for name, v in (("p", it.p), ("a", it.a)):
                if v is None and name == "a":
                    continue
                if not isinstance(v, (int, float, np.floating)) or not math.isfinite(v) or not 0 <= v <= 1:
                    raise ValueError(f"{where}: {name} must be a score in [0, 1], got {v!r}")

    def refine(self, items: Sequence[RefineItem]) -> list[RefineOutcome]:
        """Route, mask, refine (stage 1, stage 2), map back and guard every item; one outcome each."""
        cfg = self.cfg
        # 1. Check inputs
        self.check_inputs(items)

        # 2. Route, build masks, plan steps and sizes
        works: list[_Work] = []
        for i, it in enumerate(items):
            route = it.route or choose_route(it.p, it.a, self.routing)
            masks = build_mask_pair(it.P, it.A, cfg.mask, scale=max(np.shape(it.P)) / max(it.size))
            if route == "full" and not masks.binary.any():
                route = "light"  # nothing to inpaint
            s1 = stage1_strength(it.p, it.a, cfg)
            plan = split_steps(cfg.steps, cfg.stage1_fraction, s1, cfg.delta)
            size = processing_size(*it.size, cfg.resolution)
            works.append(_Work(index=i, route=route, masks=masks, size=size, plan=plan, strength1=s1))
        active = [w for w in works if w.route in ("light", "full")]

        if active:
            stage1, stage2 = self.pipelines
            # 3. Resize to the processing size
            for w in active:
                img = items[w.index].image
                small = img if img.size == w.size else img.resize(w.size, Image.LANCZOS)
                w.current = _to_tensor(small)

            # 4. Stage 1: inpaint the low-quality mask (route full), grouped by size and steps
            groups: dict[tuple, list[_Work]] = defaultdict(list)
            for w in active:
                if w.route == "full" and w.plan.n1 > 0:
                    groups[(w.size, w.plan.steps1)].append(w)
            for (size, steps1), group in groups.items():
                for chunk in _chunks(group, self.max_batch):
                    self._stage1(stage1, items, chunk, size, steps1)

            # 5. Stage 2: the global light pass at delta (routes light and full), grouped by size
            groups = defaultdict(list)
            for w in active:
                if w.plan.n2 > 0:
                    groups[(w.size, w.plan.steps2)].append(w)
            for (size, steps2), group in groups.items():
                for chunk in _chunks(group, self.max_batch):
                    self._stage2(stage2, items, chunk, size, steps2)

        # 6. Back to the original size
        results: list[Image.Image] = []
        for w in works:
            original = items[w.index]
            if w.route == "skip":
                results.append(original.image)
                continue
            out = _to_pil(w.current)
            w.current = None  # only the full-size result is held from here
            results.append(out if out.size == original.size else out.resize(original.size, Image.LANCZOS))

        # 7. No-regression guard
        after: dict[int, tuple[float, float | None]] = {}
        if cfg.guard and active:
            idx = [w.index for w in active]
            prompts = [items[i].score_prompt if items[i].score_prompt is not None
                       else (None if items[i].prompt is None else parse_emphasis(items[i].prompt)[0]) for i in idx]
            scores = list(self.rescore([results[i] for i in idx], prompts))
            if len(scores) != len(idx):
                raise ValueError(f"rescore returned {len(scores)} scores for {len(idx)} images")
            after = {i: (float(p), None if a is None else float(a)) for i, (p, a) in zip(idx, scores)}

        # 8. Outcomes
        outcomes = []
        for w in works:
            it = items[w.index]
            route, image = w.route, results[w.index]
            p_after, a_after = after.get(w.index, (None, None))
            if p_after is not None and self._worse(it, p_after, a_after):
                route, image = "reverted", it.image
            ran_stage1 = w.steps_run["stage1"] > 0
            outcomes.append(RefineOutcome(
                image=image, route=route, mask_area=w.masks.area, p_after=p_after, a_after=a_after,
                steps_run=dict(w.steps_run), mask=w.masks.binary, p_before=float(it.p),
                a_before=None if it.a is None else float(it.a),
                strength1=w.plan.effective_strength1 if ran_stage1 else None,
            ))
        return outcomes

    def _worse(self, it: RefineItem, p_after: float, a_after: float | None) -> bool:
        tol = self.cfg.guard_tolerance
        if p_after < it.p - tol:
            return True
        return it.a is not None and a_after is not None and a_after < it.a - tol

    def _stage1(self, pipe: Any, items: Sequence[RefineItem], chunk: list[_Work], size: tuple[int, int],
                steps1: int) -> None:
        w_, h_ = size
        image = torch.stack([w.current for w in chunk])  # (B, 3, h, w)
        binary = torch.stack([  # (B, 1, h, w): any coverage of a pixel counts as masked
            torch.from_numpy((_resize_map(w.masks.binary.astype(np.float32), size) > 0).astype(np.float32))
            for w in chunk])[:, None]
        soft = torch.stack([torch.from_numpy(_resize_map(w.masks.soft, size)) for w in chunk])[:, None]
        soft = soft.clamp(0, 1) * binary  # (B, 1, h, w): paste-back weights, 0 outside the mask
        counter = _StepCounter()
        # Every item of the group runs the same n1 steps at steps1 (see masks.split_steps).
        strength = max(w.strength1 for w in chunk)
        embeds = encode_refinement_prompts(pipe, [items[w.index].prompt for w in chunk], self.cfg.guidance_scale)
        out = pipe(
            **embeds, image=image, mask_image=binary, height=h_, width=w_, strength=strength,
            num_inference_steps=steps1, guidance_scale=self.cfg.guidance_scale,
            generator=[_stage_generator(items[w.index].seed, 1) for w in chunk],
            output_type="pt", callback_on_step_end=counter,
        ).images.float().cpu()  # (B, 3, h, w) in [0, 1]
        blended = image + soft * (out - image)  # unmasked pixels stay as they were
        for k, w in enumerate(chunk):
            w.current = blended[k]
            w.steps_run["stage1"] = counter.n
        log.debug("stage 1: %d items at %s, %d steps (num_inference_steps=%d)", len(chunk), size, counter.n, steps1)

    def _stage2(self, pipe: Any, items: Sequence[RefineItem], chunk: list[_Work], size: tuple[int, int],
                steps2: int) -> None:
        image = torch.stack([w.current for w in chunk])  # (B, 3, h, w)
        counter = _StepCounter()
        embeds = encode_refinement_prompts(pipe, [items[w.index].prompt for w in chunk],
                                           self.cfg.stage2_guidance_scale)
        out = pipe(
            **embeds, image=image, strength=self.cfg.delta, num_inference_steps=steps2,
            guidance_scale=self.cfg.stage2_guidance_scale,
            generator=[_stage_generator(items[w.index].seed, 2) for w in chunk],
            output_type="pt", callback_on_step_end=counter,
        ).images.float().cpu()  # (B, 3, h, w) in [0, 1]
        for k, w in enumerate(chunk):
            w.current = out[k]
            w.steps_run["stage2"] = counter.n
        log.debug("stage 2: %d items at %s, %d steps (num_inference_steps=%d)", len(chunk), size, counter.n, steps2)


def _chunks(seq: list, n: int) -> list[list]:
    return [seq[i:i + n] for i in range(0, len(seq), n)]
