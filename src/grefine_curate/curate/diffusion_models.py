"""Loading the two diffusion pipelines of the balanced refiner (G-Refine, section 3.3).

One factory, ``load_refiner_pipelines(cfg)``, returns (stage-1 inpainting pipeline, stage-2 img2img
pipeline) for a preset's ``refiner.kind``:

    sdxl   StableDiffusionXLInpaintPipeline (diffusers/stable-diffusion-xl-1.0-inpainting-0.1)
           + StableDiffusionXLImg2ImgPipeline (stabilityai/stable-diffusion-xl-refiner-1.0)
    sd15   StableDiffusionInpaintPipeline + StableDiffusionImg2ImgPipeline (SD 1.5 pair)
    tiny   SDXL-shaped pipelines with random weights built in code (width 32, no download at all);
           for tests and offline installation checks: their images carry no meaning

Weights load with diffusers ``from_pretrained`` from the Hugging Face cache (``models_dir`` is the
cache dir; ``grefine-curate models pull PRESET --to DIR`` fills it) or from a local diffusers folder
given as the model id. The cache is always tried first (``local_files_only``), so a machine without
network fails within seconds with a ``ModelUnavailableError`` saying what is missing, where it was
looked for and how to provide it; a download is tried only when ``HF_HUB_OFFLINE`` is not set.

``refiner.random_weights = true`` builds a preset's full-size architecture from the published
configs shipped in ``configs/arch/`` (no download), directly on the target device, to benchmark
compute anywhere.

Shared components (memory): the SDXL refiner has no first text encoder and uses the same frozen
OpenCLIP ViT-bigG text encoder (``text_encoder_2``) and the same VAE architecture as SDXL, so the
stage-2 pipeline reuses stage 1's ``text_encoder_2``, ``tokenizer_2`` and ``vae`` (as diffusers'
own base + refiner recipe does): about 1.5 GB of fp16 weights loaded once. SD 1.5's img2img reuses
the inpainting model's text encoder, tokenizer and VAE (the inpainting model was fine-tuned with
them frozen). Only the UNets and schedulers are separate. The SD 1.5 safety checker is not loaded:
a curation job must not silently replace images with black ones.

Exact step counts: the refiner makes diffusers run exactly n1 and n2 denoising steps
(``masks.split_steps``); that needs a scheduler whose ``set_timesteps(N)`` yields N timesteps.
SDXL's Euler does; SD 1.5's PNDM yields N + 1, so it is swapped for Euler on the same config.

Devices: CUDA with float16 (``refiner.dtype = "auto"``; bfloat16 selectable) and the preset's weight
variant preferred; CPU with float32 (``auto``, and in place of float16) or bfloat16 when asked. Options: model CPU offload (CUDA only), attention slicing, VAE
tiling.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from grefine_curate.curate.clip_models import resolve_device, resolve_dtype
from grefine_curate.curate.config import RefinerConfig
from grefine_curate.curate.errors import ConfigError, ModelUnavailableError
from grefine_curate.curate.hub import downloads_allowed, hub_offline, why_no_download  # noqa: F401 (hub_offline re-exported)

log = logging.getLogger(__name__)

KINDS = ("sdxl", "sd15", "tiny")

# Sub-folders each stage needs from its repository; stage 2 borrows the rest from stage 1.
_STAGE_FOLDERS = {
    "sdxl": {
        "stage1": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
        "stage2": ("unet", "scheduler"),
    },
    "sd15": {
        "stage1": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
        "stage2": ("unet", "scheduler"),
    },
}
_WEIGHT_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2")


def hf_cache_location(models_dir: str | os.PathLike | None) -> str:
    """Where from_pretrained looks: the given dir, else the Hugging Face cache of this environment."""
    if models_dir:
        return str(models_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


# --------------------------------------------------------------------------------------------- #
# What a preset needs (used by `models pull` / `models list`)
# --------------------------------------------------------------------------------------------- #


@dataclass(frozen=True)
class RepoNeed:
    component: str  # "stage1 inpaint" | "stage2 img2img"
    repo: str  # Hugging Face model id, or a local folder
    folders: tuple[str, ...]  # sub-folders this stage loads from the repo
    variant: str | None  # weight variant to fetch ("fp16"), None = full precision files

    def allow_patterns(self) -> list[str]:
        """Files `models pull` fetches: the index, configs and tokenizer files, and the weights."""
        pats = ["model_index.json"]
        for folder in self.folders:
            pats += [f"{folder}/*.json", f"{folder}/*.txt"]
            if folder in _WEIGHT_FOLDERS:
                pats.append(f"{folder}/*.{self.variant}.safetensors" if self.variant else f"{folder}/*.safetensors")
        return pats

    def ignore_patterns(self) -> list[str]:
        return [] if self.variant else ["*.fp16.safetensors", "*.bf16.safetensors"]


def _variant(cfg: RefinerConfig) -> str | None:
    return cfg.variant or None  # presets write "" for "none"


def weight_manifest(cfg: RefinerConfig) -> list[RepoNeed]:
    """The repositories (and their sub-folders) ``load_refiner_pipelines`` reads for this config."""
    if cfg.kind == "tiny" or cfg.random_weights:
        return []
    if cfg.kind not in _STAGE_FOLDERS:
        raise ConfigError(f"refiner.kind {cfg.kind!r} unknown; choose one of {', '.join(KINDS)}")
    folders = _STAGE_FOLDERS[cfg.kind]
    return [
        RepoNeed("stage1 inpaint", cfg.inpaint_model, folders["stage1"], _variant(cfg)),
        RepoNeed("stage2 img2img", cfg.img2img_model, folders["stage2"], _variant(cfg)),
    ]


# --------------------------------------------------------------------------------------------- #
# Tokenizer and tiny components, built in code
# --------------------------------------------------------------------------------------------- #


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenAI CLIP's vocabulary and merges, from the BPE file bundled with open_clip."""
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    vocab = dict(bpe.encoder)  # 49408 entries; open_clip names the two special tokens differently
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    return vocab, merges


@functools.lru_cache(maxsize=4)
def clip_tokenizer(pad_token: str = "<|endoftext|>") -> Any:
    """A transformers ``CLIPTokenizer`` from open_clip's bundled BPE vocabulary (no download).

    SDXL's first tokenizer pads with "<|endoftext|>", its second with "!"; the vocabulary and
    merges are OpenAI CLIP's in both cases. Cached: pipelines built in one process share it.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77, pad_token=pad_token)


TINY_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
             "projection_dim": 32, "hidden_act": "gelu", "vocab_size": 49408, "max_position_embeddings": 77,
             "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
TINY_TIME_EMBED = 8  # addition_time_embed_dim of the tiny UNets


def _tiny_unet(in_channels: int, cross_attention_dim: int, n_time_ids: int) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=in_channels,  # 9 = latents + mask + masked-image latents (inpainting)
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_TIME_EMBED,
        transformer_layers_per_block=(1, 1),
        # (number of time ids) * addition_time_embed_dim + text-encoder-2 projection dim
        projection_class_embeddings_input_dim=n_time_ids * TINY_TIME_EMBED + TINY_TEXT["projection_dim"],
        cross_attention_dim=cross_attention_dim,  # sum of the text encoders' hidden sizes
        norm_num_groups=32,
    )


def build_tiny_pipelines(seed: int = 0) -> tuple[Any, Any]:
    """Tiny random-weight SDXL-shaped (inpaint, refiner-style img2img) pair; deterministic for a seed.

    Same structure as the sdxl kind: stage 2 has only text_encoder_2 and shares it, its tokenizer
    and the VAE with stage 1; stage 2 is conditioned on an aesthetic score (5 time ids) like the
    SDXL refiner, stage 1 on the target size (6 time ids).
    """
    from diffusers import (AutoencoderKL, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLInpaintPipeline)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet1 = _tiny_unet(in_channels=9, cross_attention_dim=2 * TINY_TEXT["hidden_size"], n_time_ids=6)
        unet2 = _tiny_unet(in_channels=4, cross_attention_dim=TINY_TEXT["hidden_size"], n_time_ids=5)
        vae = AutoencoderKL(
            block_out_channels=(32, 64), in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4, sample_size=64, norm_num_groups=32,
            force_upcast=False,  # fp32 already; upcasting would only re-cast it and log a warning per call
        )
        text_cfg = CLIPTextConfig(**TINY_TEXT)
        text_encoder = CLIPTextModel(text_cfg)
        text_encoder_2 = CLIPTextModelWithProjection(text_cfg)
    finally:
        torch.random.set_rng_state(rng_state)
    tok, tok_2 = clip_tokenizer("<|endoftext|>"), clip_tokenizer("!")
    stage1 = StableDiffusionXLInpaintPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok, tokenizer_2=tok_2,
        unet=unet1, scheduler=build_scheduler("sdxl"), requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    stage2 = StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=tok_2,
        unet=unet2, scheduler=build_scheduler("sdxl"), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    for module in (unet1, unet2, vae, text_encoder, text_encoder_2):
        module.eval().requires_grad_(False)
    return stage1, stage2


# --------------------------------------------------------------------------------------------- #
# Full-size architectures from configs/arch (random_weights)
# --------------------------------------------------------------------------------------------- #


def arch_dir() -> Path:
    return Path(str(resources.files("grefine_curate") / "configs" / "arch"))


def arch_config(name: str) -> dict[str, Any]:
    """A published component config from configs/arch (``sdxl_inpaint_unet``, ``sd15_vae``, ...)."""
    path = arch_dir() / f"{name}.json"
    if not path.exists():
        names = sorted(p.stem for p in arch_dir().glob("*.json"))
        raise ConfigError(f"no architecture config {name!r} in {arch_dir()}; available: {', '.join(names)}")
    with open(path) as f:
        return json.load(f)


def build_arch_component(name: str, device: str | torch.device | None = None,
                         dtype: torch.dtype | None = None) -> Any:
    """Build one component with random weights from its published config, directly on ``device``.

    ``device="meta"`` builds it without allocating memory (shapes and parameter counts only).
    ``dtype`` builds the parameters in that type from the start: an SDXL UNet built in float32 and
    then cast would need 10 GB more at its peak than one built in bfloat16.
    """
    import diffusers
    import transformers

    raw = arch_config(name)
    cls_name = raw["_class_name"]
    cfg = {k: v for k, v in raw.items() if not k.startswith("_")}
    if cls_name.endswith("Scheduler"):  # no parameters; its tables stay on the CPU
        return getattr(diffusers, cls_name).from_config(cfg)
    default_dtype = torch.get_default_dtype()
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        with torch.device(device or "cpu"):
            if cls_name.startswith("CLIPText"):
                return getattr(transformers, cls_name)(transformers.CLIPTextConfig(**cfg))
            return getattr(diffusers, cls_name).from_config(cfg)
    finally:
        torch.set_default_dtype(default_dtype)


def build_scheduler(kind: str) -> Any:
    """The preset's scheduler from its shipped config (Euler for every kind; see the module docstring)."""
    return build_arch_component(f"{'sd15' if kind == 'sd15' else 'sdxl'}_scheduler")


def build_random_pipelines(kind: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """A preset's full-size pipelines with random weights (compute benchmarks without downloads)."""
    import diffusers

    def part(name: str) -> Any:
        module = build_arch_component(name, device, dtype)
        return module.to(dtype=dtype).eval().requires_grad_(False)

    if kind == "sdxl":
        vae, te2 = part("sdxl_vae"), part("sdxl_text_encoder_2")
        tok_2 = clip_tokenizer("!")
        stage1 = diffusers.StableDiffusionXLInpaintPipeline(
            vae=vae, text_encoder=part("sdxl_text_encoder"), text_encoder_2=te2,
            tokenizer=clip_tokenizer(), tokenizer_2=tok_2, unet=part("sdxl_inpaint_unet"),
            scheduler=build_scheduler("sdxl"), add_watermarker=False,
        )
        stage2 = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None, tokenizer_2=tok_2,
            unet=part("sdxl_refiner_unet"), scheduler=build_scheduler("sdxl"),
            requires_aesthetics_score=True, add_watermarker=False,
        )
    elif kind == "sd15":
        vae, te = part("sd15_vae"), part("sd15_text_encoder")
        tok = clip_tokenizer()
        stage1 = diffusers.StableDiffusionInpaintPipeline(
            vae=vae, text_encoder=te, tokenizer=tok, unet=part("sd15_inpaint_unet"),
            scheduler=build_scheduler("sd15"), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        stage2 = diffusers.StableDiffusionImg2ImgPipeline(
            vae=vae, text_encoder=te, tokenizer=tok, unet=part("sd15_unet"),
            scheduler=build_scheduler("sd15"), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        raise ConfigError(f"random_weights needs refiner.kind sdxl or sd15, got {kind!r}")
    return stage1, stage2


# --------------------------------------------------------------------------------------------- #
# Pretrained weights
# --------------------------------------------------------------------------------------------- #


def _how_to_provide(kind: str, where: str) -> str:
    return (
        f"Looked in the Hugging Face cache at {where}"
        f"{'' if downloads_allowed() else f' ({why_no_download()})'}. "
        f"Provide the weights with `grefine-curate models pull PRESET --to DIR` (e.g. PRESET = {kind}) on a "
        f"machine with internet, "
        f"copy DIR here and pass `--models-dir DIR`; or set the model id in the preset to a local diffusers "
        f"folder; or use `refiner.random_weights = true` / the `tiny` preset to run without weights."
    )


def _from_pretrained(cls: Any, model: str, role: str, kind: str, models_dir: str | None, dtype: torch.dtype,
                     variants: list[str | None], **components: Any) -> Any:
    """``cls.from_pretrained`` from the cache or a local folder first, then (online only) the hub."""
    if not model:
        raise ConfigError(f"refiner: no model id for the {role} pipeline (set refiner.inpaint_model / img2img_model)")
    local = Path(model).expanduser()
    is_local = local.is_dir()
    source = str(local) if is_local else model
    errors: list[str] = []

    def attempt(local_only: bool) -> Any:
        for variant in variants:
            try:
                return cls.from_pretrained(source, dtype=dtype, variant=variant, cache_dir=models_dir,
                                           local_files_only=local_only, **components)
            except Exception as e:  # noqa: BLE001 - any failure means "not usable from here"; reported below
                first_line = (str(e).strip().splitlines() or [""])[0][:160]
                where = "cache" if local_only else "download"
                errors.append(f"{where} variant={variant}: {type(e).__name__}: {first_line}")
        return None

    pipe = attempt(local_only=True)
    if pipe is None and not is_local and downloads_allowed():
        pipe = attempt(local_only=False)
    if pipe is not None:
        return pipe
    if is_local:
        raise ModelUnavailableError(
            f"cannot load the {role} pipeline ({cls.__name__}) from the local folder {local}: "
            f"{'; '.join(errors)}"
        )
    raise ModelUnavailableError(
        f"weights of the {role} model {model!r} ({cls.__name__}) are not available. "
        f"{_how_to_provide(kind, hf_cache_location(models_dir))} ({'; '.join(errors)})"
    )


def _load_pretrained(cfg: RefinerConfig, models_dir: str | None, device: torch.device,
                     dtype: torch.dtype) -> tuple[Any, Any]:
    import diffusers

    variant = _variant(cfg)
    # On CUDA the reduced-precision variant first; on CPU the full-precision files first (but a
    # cache filled by `models pull` may hold only the variant, which loads and upcasts fine).
    variants = [variant, None] if device.type == "cuda" else [None, variant]
    variants = list(dict.fromkeys(variants))
    common = {"kind": cfg.kind, "models_dir": models_dir, "dtype": dtype, "variants": variants}
    if cfg.kind == "sdxl":
        stage1 = _from_pretrained(diffusers.StableDiffusionXLInpaintPipeline, cfg.inpaint_model,
                                  "stage-1 inpainting", **common)
        stage2 = _from_pretrained(diffusers.StableDiffusionXLImg2ImgPipeline, cfg.img2img_model,
                                  "stage-2 img2img", **common, text_encoder=None, tokenizer=None,
                                  text_encoder_2=stage1.text_encoder_2, tokenizer_2=stage1.tokenizer_2,
                                  vae=stage1.vae)
    elif cfg.kind == "sd15":
        none = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        stage1 = _from_pretrained(diffusers.StableDiffusionInpaintPipeline, cfg.inpaint_model,
                                  "stage-1 inpainting", **common, **none)
        stage2 = _from_pretrained(diffusers.StableDiffusionImg2ImgPipeline, cfg.img2img_model,
                                  "stage-2 img2img", **common, text_encoder=stage1.text_encoder,
                                  tokenizer=stage1.tokenizer, vae=stage1.vae, **none)
    else:
        raise ConfigError(f"refiner.kind {cfg.kind!r} unknown; choose one of {', '.join(KINDS)}")
    return stage1, stage2


def ensure_exact_step_scheduler(pipe: Any) -> None:
    """Swap a scheduler whose ``set_timesteps(N)`` does not yield N order-1 steps for Euler."""
    import copy

    from diffusers import EulerDiscreteScheduler

    probe = copy.deepcopy(pipe.scheduler)
    exact = getattr(probe, "order", 1) == 1
    for n in (7, 20):
        if not exact:
            break
        probe.set_timesteps(n)
        exact = len(probe.timesteps) == n
    if not exact:
        log.info("replacing %s by EulerDiscreteScheduler so that step counts are exact",
                 type(pipe.scheduler).__name__)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)


def _finish(pipe: Any, cfg: RefinerConfig, device: torch.device) -> None:
    ensure_exact_step_scheduler(pipe)
    pipe.set_progress_bar_config(disable=True)
    if cfg.cpu_offload and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    else:
        if cfg.cpu_offload:
            log.info("refiner.cpu_offload ignored on %s (it moves models between CPU and a GPU)", device)
        pipe.to(device)
    if cfg.attention_slicing:
        pipe.enable_attention_slicing()
    if cfg.vae_tiling:
        pipe.vae.enable_tiling()


def load_refiner_pipelines(cfg: RefinerConfig, models_dir: str | os.PathLike | None = None,
                           device: str | torch.device | None = None) -> tuple[Any, Any]:
    """(stage-1 inpainting pipeline, stage-2 img2img pipeline) for ``cfg.kind`` (module docstring)."""
    if cfg.kind not in KINDS:
        raise ConfigError(f"refiner.kind {cfg.kind!r} unknown; choose one of {', '.join(KINDS)}")
    dev = resolve_device("auto") if device is None else torch.device(device)
    if cfg.kind == "tiny":
        stage1, stage2 = build_tiny_pipelines()
    else:
        try:
            dtype = resolve_dtype(cfg.dtype, dev)
        except ValueError as e:
            raise ConfigError(f"refiner.dtype: {e}") from e
        if dtype == torch.float16 and dev.type == "cpu":
            # float16 kernels are missing or slow on CPUs; bfloat16 is honoured (half the memory of
            # float32, which is what lets the full-size SDXL pair run on a 24 GB machine).
            log.info("refiner.dtype float16 on CPU: using float32 (bfloat16 is supported on CPU)")
            dtype = torch.float32
        if cfg.random_weights:
            stage1, stage2 = build_random_pipelines(cfg.kind, dev, dtype)
        else:
            stage1, stage2 = _load_pretrained(cfg, str(models_dir) if models_dir else None, dev, dtype)
    for pipe in (stage1, stage2):
        _finish(pipe, cfg, dev)
    return stage1, stage2
