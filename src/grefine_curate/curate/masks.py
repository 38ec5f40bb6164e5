"""The refiner's mask, stage-1 strength and step split (G-Refine, section 3.3, eq. 9-10).

Mask (eq. 9, ``Bi(1 - P + A)``). P is the perceptual quality map (high = good), A the alignment map
(high = needs refinement), both (H, W) float32 in [0, 1] at the image's own size or a reduction of it.

- ``mode = "paper"``: refine where ``clip(1 - P + A, 0, 1) > threshold``. The clip puts the map in
  [0, 1] before binarising, so with no alignment defect (A = 0) the rule is "P < 1 - threshold"
  (P < 0.5 at the default 0.5) and an unmatched phrase (A near 1) is refined wherever it falls.
  (Halving instead, ``(1 - P + A) / 2 > 0.5``, would mean "A > P": an image without alignment
  defects would never get a mask, and stage 1 would never fix a perceptual defect.)
- ``mode = "reference-union"``: the authors' notebook, ``(P < p_low) | (A > a_high)`` with
  p_low = 100/255 and a_high = 170/255.

Dilation and feathering (defaults in ``MaskConfig``: dilate = 8 px, feather = 4 px, at the image's
own size; scaled down with maps that are a reduction of it, ``Preset.map_max_side``). The binary
mask is grown by ``dilate`` pixels (Euclidean disk) so that seams at the edge
of a defect are regenerated too; that dilated binary mask is what the inpainting pipeline gets
(diffusers binarises inpainting masks at 0.5 anyway). The soft mask used to paste stage 1's
pixels back is 1 inside, falls to 0 with a smoothstep over the outer ``feather`` pixels of the
dilated band (on the signed distance to the thresholded mask, so it reaches inward when
feather > dilate) and is exactly 0 outside the dilated mask: pixels outside it stay original.

Stage-1 strength (eq. 9 writes ``(p + a) / 2``, whose direction is ambiguous): with quality
q = (p + a) / 2, or q = p when there is no prompt, the strength falls linearly from strength_max
at q = 0 to strength_min at q = 1. A worse image never gets a weaker stage 1.

Steps (eq. 10): n iterations split n1 = round(n * fraction) (half up), n2 = n - n1. diffusers'
img2img and inpainting pipelines (``get_timesteps``, both SD 1.5 and SDXL, diffusers 0.42) run
``min(int(num_inference_steps * strength), num_inference_steps)`` denoising steps for a scheduler
of order 1 whose ``set_timesteps(N)`` yields N timesteps (Euler, DDIM; SD 1.5's PNDM yields N + 1,
and the loader swaps it for Euler). ``split_steps`` returns, per stage, the smallest
``num_inference_steps`` N with int(N * strength) == n_stage, so exactly n1 and n2 steps run. The
strength that actually acts is then n_stage / N (diffusers starts at timestep index N - n_stage).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from grefine_curate.curate.config import MaskConfig, RefinerConfig
from grefine_curate.curate.errors import ConfigError

MASK_MODES = ("paper", "reference-union")


@dataclass(frozen=True)
class MaskPair:
    binary: np.ndarray  # (H, W) bool: dilated low-quality mask, what stage 1 inpaints
    soft: np.ndarray  # (H, W) float32 in [0, 1]: feathered paste-back weights, 0 outside `binary`

    @property
    def area(self) -> float:
        """Fraction of the image the (dilated) mask covers."""
        return float(self.binary.mean()) if self.binary.size else 0.0


def _as_map(name: str, arr: np.ndarray | None, shape: tuple[int, int] | None) -> np.ndarray | None:
    if arr is None:
        return None
    m = np.asarray(arr, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"{name} must be an (H, W) map, got an array of shape {m.shape}")
    if shape is not None and m.shape != shape:
        raise ValueError(f"{name} has shape {m.shape} but P has shape {shape}; both maps must be at the image's size")
    if not np.isfinite(m).all():
        raise ValueError(f"{name} contains NaN or infinite values; maps must be finite numbers in [0, 1]")
    return m


def threshold_mask(P: np.ndarray, A: np.ndarray | None, cfg: MaskConfig) -> np.ndarray:
    """The binarised low-quality mask before dilation: (H, W) bool (rules in the module docstring)."""
    P = _as_map("P", P, None)
    A = _as_map("A", A, P.shape)
    if cfg.mode == "paper":
        value = 1.0 - P if A is None else 1.0 - P + A  # (H, W), in [-1, 2] before the clip
        return np.clip(value, 0.0, 1.0) > cfg.threshold
    if cfg.mode == "reference-union":
        low_p = P < cfg.p_low
        return low_p if A is None else low_p | (A > cfg.a_high)
    raise ConfigError(f"refiner.mask.mode {cfg.mode!r} unknown; choose one of {', '.join(MASK_MODES)}")


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def build_mask_pair(P: np.ndarray, A: np.ndarray | None, cfg: MaskConfig, scale: float = 1.0) -> MaskPair:
    """Thresholded, dilated binary mask and its feathered paste-back weights, at P's size.

    ``scale``: map pixels per image pixel, below 1 when the maps are a reduction of the image
    (``Preset.map_max_side``): ``dilate`` and ``feather`` are image pixels, so they shrink with it.
    """
    if cfg.dilate < 0 or cfg.feather < 0:
        raise ConfigError(f"refiner.mask.dilate and feather must be >= 0 pixels, got {cfg.dilate} and {cfg.feather}")
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"scale (map pixels per image pixel) must be in (0, 1], got {scale}")
    dilate, feather = cfg.dilate * scale, cfg.feather * scale
    core = threshold_mask(P, A, cfg)  # (H, W) bool
    if not core.any():
        return MaskPair(binary=core, soft=np.zeros(core.shape, np.float32))
    if core.all():
        return MaskPair(binary=core, soft=np.ones(core.shape, np.float32))
    # Signed distance to the core's edge: > 0 outside (distance to the nearest core pixel),
    # <= 0 inside (minus the distance to the nearest outside pixel).
    d_out = ndimage.distance_transform_edt(~core)
    d_in = ndimage.distance_transform_edt(core) if feather > dilate else 0.0
    signed = d_out - d_in  # (H, W) float64
    binary = signed <= dilate
    if feather == 0:
        soft = binary.astype(np.float32)
    else:
        # 1 at distance dilate - feather and closer, 0 at distance dilate and beyond.
        soft = _smoothstep((dilate - signed) / feather).astype(np.float32)
        soft[~binary] = 0.0
    return MaskPair(binary=binary, soft=soft)


def build_mask(P: np.ndarray, A: np.ndarray | None, cfg: MaskConfig) -> np.ndarray:
    """The low-quality mask stage 1 inpaints: (H, W) bool, thresholded then dilated."""
    return build_mask_pair(P, A, cfg).binary


def feather_mask(P: np.ndarray, A: np.ndarray | None, cfg: MaskConfig) -> np.ndarray:
    """The feathered paste-back weights of ``build_mask``: (H, W) float32 in [0, 1]."""
    return build_mask_pair(P, A, cfg).soft


def check_strength_bounds(cfg: RefinerConfig) -> None:
    if not 0.0 < cfg.strength_min <= cfg.strength_max <= 1.0:
        raise ConfigError(
            f"refiner strengths must satisfy 0 < strength_min <= strength_max <= 1, got "
            f"strength_min={cfg.strength_min}, strength_max={cfg.strength_max}"
        )
    if not 0.0 < cfg.delta <= 1.0:
        raise ConfigError(f"refiner.delta (stage-2 strength) must be in (0, 1], got {cfg.delta}")


def stage1_strength(p: float, a: float | None, cfg: RefinerConfig) -> float:
    """Stage-1 (inpainting) strength: strength_max at quality 0 down to strength_min at quality 1."""
    check_strength_bounds(cfg)
    for name, v in (("p", p), ("a", a)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ValueError(f"{name} must be a score in [0, 1], got {v!r}")
    q = float(p) if a is None else (float(p) + float(a)) / 2.0  # eq. 9's (p + a) / 2
    return cfg.strength_max - (cfg.strength_max - cfg.strength_min) * q


def diffusers_steps_run(num_inference_steps: int, strength: float) -> int:
    """Denoising steps diffusers' img2img/inpaint ``get_timesteps`` keeps (order-1 scheduler)."""
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init_timestep, 0)
    return num_inference_steps - t_start


def num_inference_steps_for(n_run: int, strength: float) -> int:
    """Smallest ``num_inference_steps`` for which diffusers runs exactly ``n_run`` steps at ``strength``."""
    if n_run < 0:
        raise ValueError(f"number of steps to run must be >= 0, got {n_run}")
    if not (isinstance(strength, (int, float)) and 0.0 < strength <= 1.0):
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    if n_run == 0:
        return 0
    if strength < 1e-3:
        raise ValueError(f"strength {strength} is too small to run {n_run} steps (needs >= 0.001)")
    # int(N * s) grows by at most 1 per unit of N (s <= 1), so the first N reaching n_run hits it.
    N = max(n_run, math.floor(n_run / strength) - 1)
    while N > n_run and diffusers_steps_run(N - 1, strength) >= n_run:
        N -= 1
    while diffusers_steps_run(N, strength) < n_run:
        N += 1
    assert diffusers_steps_run(N, strength) == n_run, (N, n_run, strength)
    return N


@dataclass(frozen=True)
class StepPlan:
    n1: int  # denoising steps stage 1 runs (eq. 10)
    n2: int  # denoising steps stage 2 runs
    steps1: int  # num_inference_steps to pass to the stage-1 pipeline (0 when n1 == 0)
    steps2: int  # num_inference_steps to pass to the stage-2 pipeline (0 when n2 == 0)

    @property
    def effective_strength1(self) -> float:
        """The strength that acts in stage 1: diffusers starts at timestep index steps1 - n1."""
        return self.n1 / self.steps1 if self.steps1 else 0.0

    @property
    def effective_strength2(self) -> float:
        return self.n2 / self.steps2 if self.steps2 else 0.0


def split_steps(n: int, fraction: float, strength1: float, strength2: float) -> StepPlan:
    """Split n iterations into n1 + n2 and the ``num_inference_steps`` that make diffusers run them."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"refiner.steps must be an integer >= 1, got {n!r}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"refiner.stage1_fraction must be in [0, 1], got {fraction}")
    n1 = int(math.floor(n * fraction + 0.5))  # half up: n = 5, fraction 0.5 -> n1 = 3
    n2 = n - n1
    return StepPlan(n1=n1, n2=n2, steps1=num_inference_steps_for(n1, strength1),
                    steps2=num_inference_steps_for(n2, strength2))
