"""Loading CLIP backbones for PQ-Map and AQ-Map.

One factory, ``load_clip``: an open_clip architecture with a pretrained tag (weights from the
Hugging Face cache, or downloaded when a network is there), a local checkpoint file, or the
``tiny`` architecture built in code with random weights (tests and offline installation checks;
its scores carry no quality meaning).

When weights are missing and cannot be fetched, we fail within seconds with a ``ModelUnavailableError``
naming the model, where it was looked for, and how to provide it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from grefine_curate.curate.config import ClipConfig
from grefine_curate.curate.errors import ModelUnavailableError
from grefine_curate.curate.hub import downloads_allowed, why_no_download

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The tiny architecture: same code paths as ViT-B/16 (patch 16, 224 input, CLS token, projection),
# a few narrow layers so a CPU runs it in milliseconds.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 4, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@dataclass
class ClipBundle:
    """A loaded CLIP model with what scoring needs around it."""

    model: Any  # open_clip.model.CLIP
    tokenizer: Callable[..., torch.Tensor]  # texts -> (N, 77) token ids
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device
    dtype: torch.dtype
    name: str  # human-readable id for manifests ("ViT-B-16-quickgelu/openai")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r} not one of {sorted(table)}")
    return table[dtype]


def build_tiny_clip(seed: int = 0) -> Any:
    """The ``tiny`` CLIP: random weights, built in code, deterministic for a seed."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = CLIP(
            embed_dim=TINY_CLIP["embed_dim"],
            vision_cfg=CLIPVisionCfg(**TINY_CLIP["vision_cfg"]),
            text_cfg=CLIPTextCfg(**TINY_CLIP["text_cfg"]),
            quick_gelu=True,
        )
    finally:
        torch.random.set_rng_state(gen_state)
    return model


def _fetch_pretrained(model: str, tag: str, cache_dir: str | None) -> str:
    """Return a local file for open_clip's (model, tag), from the HF cache or by download."""
    import open_clip
    from huggingface_hub import hf_hub_download

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise ModelUnavailableError(
            f"open_clip has no pretrained tag {tag!r} for {model!r}; known tags: {', '.join(tags) or 'none'}"
        )
    hub = cfg.get("hf_hub", "")
    if not hub:
        raise ModelUnavailableError(
            f"{model}/{tag} has no Hugging Face Hub copy; download its checkpoint and set "
            f"`clip.checkpoint` to the file"
        )
    repo = hub.rstrip("/")
    errors = []
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        try:  # the cache first: no network round trip when the file is there
            return hf_hub_download(repo, filename, cache_dir=cache_dir, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any miss means "not cached"
            errors.append(f"{filename}: {type(e).__name__}")
    if downloads_allowed():
        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            try:
                return hf_hub_download(repo, filename, cache_dir=cache_dir, etag_timeout=5)
            except Exception as e:  # noqa: BLE001
                errors.append(f"download {filename}: {type(e).__name__}: {str(e)[:120]}")
    where = cache_dir or os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    raise ModelUnavailableError(
        f"CLIP weights {model}/{tag} (Hugging Face repo {repo}) are not available: looked in the "
        f"Hugging Face cache at {where}{'' if downloads_allowed() else f' ({why_no_download()})'}. "
        f"Provide them with `grefine-curate models pull PRESET --to DIR` on a machine with internet "
        f"and pass `--models-dir DIR`, or set `clip.checkpoint` to a local checkpoint file. "
        f"({'; '.join(errors)})"
    )


def load_clip(cfg: ClipConfig, models_dir: str | os.PathLike | None = None, seed: int = 0) -> ClipBundle:
    """Build the CLIP model a preset names. ``models_dir`` is used as the Hugging Face cache dir."""
    import open_clip

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.model == "tiny":
        model = build_tiny_clip(seed)
        tokenizer = open_clip.get_tokenizer("ViT-B-16")
        name = "tiny/random"
    else:
        if cfg.model not in open_clip.list_models():
            import difflib

            close = difflib.get_close_matches(cfg.model, open_clip.list_models(), n=3)
            raise ModelUnavailableError(
                f"unknown open_clip architecture {cfg.model!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
            )
        if cfg.checkpoint:
            ckpt = Path(cfg.checkpoint).expanduser()
            if not ckpt.exists():
                raise ModelUnavailableError(f"CLIP checkpoint file not found: {ckpt} (clip.checkpoint)")
            pretrained = str(ckpt)
            name = f"{cfg.model}/{ckpt.name}"
        elif cfg.pretrained:
            cache = str(models_dir) if models_dir else None
            pretrained = _fetch_pretrained(cfg.model, cfg.pretrained, cache)
            name = f"{cfg.model}/{cfg.pretrained}"
        else:
            pretrained = None
            name = f"{cfg.model}/random"
        try:
            model = open_clip.create_model(cfg.model, pretrained=pretrained, device="cpu")
        except Exception as e:  # corrupt or mismatched checkpoint
            raise ModelUnavailableError(f"cannot load CLIP {name} from {pretrained}: {e}") from e
        tokenizer = open_clip.get_tokenizer(cfg.model)
    model = model.to(device=device, dtype=dtype).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return ClipBundle(model=model, tokenizer=tokenizer, mean=CLIP_MEAN, std=CLIP_STD,
                      device=device, dtype=dtype, name=name)
