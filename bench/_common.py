"""Set-up shared by the CPU overhead benchmarks (``pq_overhead.py``, ``aq_overhead.py``).

A random-weight open_clip ViT-B-16 (QuickGELU, as OpenAI's), frozen, wrapped as the project's
``ClipBundle``, and a PQ-Map with the released prompts (width 512) at 224x224, 6 surgery blocks.
The scripts run as ``python bench/<name>.py``, so this module is found beside them.
"""

from __future__ import annotations

import argparse

import torch

MODEL = "ViT-B-16-quickgelu"
IMAGE_SIZE = 224
SURGERY_BLOCKS = 6


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """--map-size, --threads and --device, the same in both scripts."""
    ap.add_argument("--map-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--device", default="cpu")


def random_vit_b16(args: argparse.Namespace):
    """(device, ClipBundle, PQMap): the random ViT-B-16 with seed 0 and its PQ-Map.

    The released prompts exercise the learned-context text path; T_p is computed once at
    construction, as in a curation job, so it is outside any timed region.
    """
    import open_clip

    from grefine_curate.curate.clip_models import CLIP_MEAN, CLIP_STD, ClipBundle
    from grefine_curate.curate.config import PQConfig
    from grefine_curate.curate.pq_map import PQMap

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL, pretrained=None).to(device).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    clip = ClipBundle(model=model, tokenizer=open_clip.get_tokenizer(MODEL), mean=CLIP_MEAN,
                      std=CLIP_STD, device=device, dtype=torch.float32, name=f"{MODEL}/random")
    pq = PQMap(clip, PQConfig(prompts="reference-pq"), surgery_blocks=SURGERY_BLOCKS, image_size=IMAGE_SIZE)
    return device, clip, pq


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer around a call measures the call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
