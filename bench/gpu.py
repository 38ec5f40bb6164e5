"""GPU benchmark of grefine-curate (issue 6): scoring throughput and refinement latency, fp16.

Full-size architectures with RANDOM weights (no download; compute is what is measured, not
quality): OpenAI-shaped CLIP ViT-B/16 for PQ-Map + AQ-Map (released PQ prompts, 85-template AQ
text ensemble, spaCy parse), and SDXL inpainting + SDXL refiner built from the published configs
in ``configs/arch`` (``diffusion_models.load_refiner_pipelines`` with ``random_weights``).

1. Scoring, batch ``--batch`` (64), images 256x256 as the score mode's draft decode of 1024x1024
   JPEGs delivers them, a different prompt per image:
     bare        ``clip.encode_image`` on a ready (B, 3, 224, 224) tensor: the CLIP forward alone
     maps        PQ-Map + AQ-Map from the same tensor: surgery forward, factor scores, cask, maps,
                 phrase scores and defects (text features cached across batches, as in a job)
     score       ``QualityScorer.score(images, prompts)``: the above plus preprocessing and parsing
   -> images/s of each and the ratios to bare.
2. Refinement of one 1024x1024 image, route full, 20 iterations = 10 (stage 1) + 10 (stage 2):
     bare        the two plain diffusers calls (inpaint on the mask, then img2img at delta) with
                 the same step counts, PIL in and out
     grefine     ``BalancedRefiner.refine`` without the guard (masks, emphasised prompt, batching,
                 paste-back, resizes) and with the no-regression guard (one re-score more)
   -> seconds per image and the ratio to bare; denoising steps actually run are checked.
3. Peak GPU memory of each part (``torch.cuda.max_memory_allocated``).

Results print as lines and, last, as one JSON object (also written to ``--out``). Built to finish
in well under 8 minutes on one H100 (pipeline build ~1 min, timed parts ~1-2 min).

``--smoke``: CPU, the ``tiny`` preset and tiny diffusion pipelines at 64x64, batch 4, one
iteration: checks that the script runs (tests/test_bench.py); its numbers mean nothing.

    PYTHONPATH=src python bench/gpu.py [--out bench-out/gpu.json]      # on a CUDA machine
    PYTHONPATH=src python bench/gpu.py --smoke                         # anywhere, ~15 s
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built in code; never wait on a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ADJ = ["red", "small", "wooden", "shiny", "old", "blue", "fluffy", "tall", "glass", "striped", "golden", "broken"]
NOUN = ["cat", "car", "house", "tree", "robot", "chair", "dog", "lamp", "boat", "guitar", "castle", "teapot"]
PLACE = ["on a beach", "in a forest", "under a bridge", "next to a window", "in the snow", "on a table"]


def prompts_for(n: int, seed: int = 0) -> list[str]:
    """n different prompts with 2-3 noun phrases each (phrases recur across prompts, as in data sets)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(ADJ, 2)
        x, y = rng.sample(NOUN, 2)
        out.append(f"a {a} {x} with a {b} {y} {rng.choice(PLACE)}, high quality photo")
    return out


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed(fn, device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


# --------------------------------------------------------------------------------------------- #
# 1. Scoring
# --------------------------------------------------------------------------------------------- #


def score_preset(args, device):
    from grefine_curate.curate.config import load_preset

    if args.smoke:
        return load_preset("tiny")
    # the paper's set-up with random CLIP weights (pretrained "" = random), fp16 on CUDA
    return load_preset("sdxl", {"clip": {"pretrained": "", "device": str(device), "dtype": args.dtype}})


def bench_scoring(args, device, scorer) -> dict:
    import torch
    from PIL import Image

    from grefine_curate.curate.surgery import preprocess_images

    preset = scorer.preset
    clip = scorer.clip
    b, side = args.batch, preset.clip.image_size
    rng = np.random.default_rng(0)
    rounds = args.warmup + args.iters
    images = [Image.fromarray(rng.integers(0, 256, (args.image_side, args.image_side, 3), dtype=np.uint8))
              for _ in range(b)]
    prompts = prompts_for(b * rounds * 2, seed=1)  # maps: first half, score: second half (no shared prompt)
    pixels = preprocess_images(images, side, clip.mean, clip.std, device=clip.device, dtype=clip.dtype)  # (B, 3, S, S)
    sizes = [(img.height, img.width) for img in images]

    def bare() -> None:
        with torch.inference_mode():
            clip.model.encode_image(pixels)  # (B, D)

    k = {"maps": 0, "score": 0}

    def maps() -> None:
        with torch.inference_mode():
            tokens = scorer.pq.encoder(pixels)  # (B, 1+HW, D)
            scorer.pq.from_tokens(tokens, sizes)
            batch_prompts = prompts[(k["maps"] % rounds) * b:(k["maps"] % rounds + 1) * b]
            scorer.aq.from_tokens(tokens, sizes, batch_prompts)
        k["maps"] += 1

    def score() -> None:
        batch_prompts = prompts[(rounds + k["score"] % rounds) * b:(rounds + k["score"] % rounds + 1) * b]
        scorer.score(images, batch_prompts)
        k["score"] += 1

    out: dict = {"preset": preset.name, "clip": clip.name, "dtype": str(clip.dtype).replace("torch.", ""),
                 "batch": b, "image_side": args.image_side, "clip_input": side}
    for name, fn in (("bare", bare), ("maps", maps), ("score", score)):
        reset_peak(device)
        times = timed(fn, device, args.warmup, args.iters)
        med = statistics.median(times)
        out[f"{name}_images_per_s"] = round(b / med, 2)
        out[f"{name}_batch_s"] = round(med, 5)
        out[f"{name}_peak_gb"] = peak_gb(device)
    out["maps_ratio_to_bare"] = round(out["maps_batch_s"] / out["bare_batch_s"], 3)
    out["score_ratio_to_bare"] = round(out["score_batch_s"] / out["bare_batch_s"], 3)
    cache = getattr(scorer.aq, "cache", None)
    out["text_cache"] = cache.stats() if hasattr(cache, "stats") else None  # hits / misses over the run
    return out


# --------------------------------------------------------------------------------------------- #
# 2. Refinement
# --------------------------------------------------------------------------------------------- #


class StepCount:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, pipe, step, timestep, kwargs):
        self.n += 1
        return kwargs


def bench_refine(args, device, scorer) -> dict:
    import torch
    from PIL import Image

    from grefine_curate.curate.config import load_preset
    from grefine_curate.curate.diffusion_models import load_refiner_pipelines
    from grefine_curate.curate.masks import build_mask_pair, split_steps, stage1_strength
    from grefine_curate.curate.refiner import BalancedRefiner, RefineItem

    if args.smoke:
        preset = load_preset("tiny")
        cfg = dataclasses.replace(preset.refiner, steps=4)
    else:
        preset = load_preset("sdxl")
        cfg = dataclasses.replace(preset.refiner, random_weights=True, steps=20, stage1_fraction=0.5,
                                  dtype=args.dtype, resolution=1024)
    res = cfg.resolution
    t0 = time.perf_counter()
    reset_peak(device)
    stage1, stage2 = load_refiner_pipelines(cfg, device=device)
    sync(device)
    load_s = time.perf_counter() - t0

    # One image, route full: a low-quality disc in P, an unmatched region in A.
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8))
    yy, xx = np.mgrid[0:res, 0:res] / res
    P = np.clip(((xx - 0.35) ** 2 + (yy - 0.4) ** 2) * 8, 0, 1).astype(np.float32)  # (H, W), low near (0.35, 0.4)
    A = np.clip(1 - ((xx - 0.7) ** 2 + (yy - 0.65) ** 2) * 12, 0, 1).astype(np.float32)  # (H, W), high near (0.7, 0.65)
    p, a = 0.3, 0.4
    prompt = "a red car parked next to a wooden house, blue sky"
    item = RefineItem(image=image, prompt=f"{prompt}, red car", p=p, a=a, P=P, A=A, seed=1234, route="full",
                      score_prompt=prompt)
    s1 = stage1_strength(p, a, cfg)
    plan = split_steps(cfg.steps, cfg.stage1_fraction, s1, cfg.delta)
    mask = Image.fromarray((build_mask_pair(P, A, cfg.mask).binary * 255).astype(np.uint8), "L")

    def bare() -> dict:
        c1, c2 = StepCount(), StepCount()
        g = torch.Generator("cpu").manual_seed(0)
        out1 = stage1(prompt=prompt, image=image, mask_image=mask, height=res, width=res, strength=s1,
                      num_inference_steps=plan.steps1, guidance_scale=cfg.guidance_scale, generator=g,
                      callback_on_step_end=c1).images[0]
        stage2(prompt=prompt, image=out1, strength=cfg.delta, num_inference_steps=plan.steps2,
               guidance_scale=cfg.stage2_guidance_scale, generator=g, callback_on_step_end=c2)
        return {"stage1": c1.n, "stage2": c2.n}

    plain = BalancedRefiner(dataclasses.replace(cfg, guard=False), preset.routing, pipelines=(stage1, stage2))
    steps_seen: dict = {}

    def grefine() -> None:
        steps_seen.update(plain.refine([item])[0].steps_run)

    out: dict = {"kind": cfg.kind, "resolution": res, "dtype": str(stage1.unet.dtype).replace("torch.", ""),
                 "steps_planned": {"stage1": plan.n1, "stage2": plan.n2},
                 "num_inference_steps": {"stage1": plan.steps1, "stage2": plan.steps2},
                 "strength": {"stage1": round(s1, 4), "stage2": cfg.delta}, "load_s": round(load_s, 2),
                 "load_peak_gb": peak_gb(device)}
    bare_steps: dict = {}
    reset_peak(device)
    t_bare = timed(lambda: bare_steps.update(bare()), device, args.warmup, args.iters)
    out["bare_peak_gb"] = peak_gb(device)
    reset_peak(device)
    t_gref = timed(grefine, device, args.warmup, args.iters)
    out["grefine_peak_gb"] = peak_gb(device)
    out["bare_s_per_image"] = round(statistics.median(t_bare), 4)
    out["grefine_s_per_image"] = round(statistics.median(t_gref), 4)
    out["grefine_ratio_to_bare"] = round(out["grefine_s_per_image"] / out["bare_s_per_image"], 3)
    out["steps_run_bare"] = bare_steps
    out["steps_run_grefine"] = steps_seen

    # With the no-regression guard: the refiner re-scores its output with the (random) scorer.
    guarded = BalancedRefiner(cfg, preset.routing, pipelines=(stage1, stage2), rescore=scorer.rescore)
    t_guard = timed(lambda: guarded.refine([item]), device, 0 if args.smoke else 1, max(1, args.iters // 2))
    out["grefine_guard_s_per_image"] = round(statistics.median(t_guard), 4)
    out["peak_gb"] = peak_gb(device)
    return out


# --------------------------------------------------------------------------------------------- #


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models, one iteration (checks the script only)")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--dtype", default="float16", help="float16 (default) or bfloat16 on CUDA")
    ap.add_argument("--batch", type=int, default=None, help="scoring batch (default 64; smoke 4)")
    ap.add_argument("--image-side", type=int, default=256, help="side of the decoded images handed to the scorer")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 2; smoke 0)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 5; smoke 1)")
    ap.add_argument("--skip-refine", action="store_true")
    ap.add_argument("--skip-score", action="store_true")
    ap.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = ap.parse_args(argv)

    import torch

    wall0 = time.perf_counter()
    if args.smoke:
        args.device = args.device or "cpu"
        args.dtype = "float32"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.smoke:
        ap.error("no CUDA device: this benchmark measures a GPU; use --smoke to check the script on a CPU")
    args.batch = args.batch or (4 if args.smoke else 64)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 2)
    args.iters = args.iters if args.iters is not None else (1 if args.smoke else 5)
    if args.smoke:
        torch.set_num_threads(1)  # tiny models: threads only add contention (and CI machines are shared)
    torch.backends.cuda.matmul.allow_tf32 = True

    result: dict = {
        "benchmark": "grefine-curate bench/gpu.py",
        "smoke": args.smoke,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, **_versions("diffusers", "transformers", "open_clip_torch", "spacy")},
        "weights": "random (full-size architectures built in code; compute only, no quality meaning)"
                   if not args.smoke else "random (tiny preset)",
    }
    from grefine_curate.curate.scorer import QualityScorer

    t0 = time.perf_counter()
    scorer = QualityScorer(score_preset(args, device))  # scoring, and the refiner's guard
    result["scorer_load_s"] = round(time.perf_counter() - t0, 2)
    if not args.skip_score:
        s = bench_scoring(args, device, scorer)
        result["score"] = s
        print(f"score  batch {s['batch']}: bare CLIP {s['bare_images_per_s']:.1f} img/s | PQ+AQ maps "
              f"{s['maps_images_per_s']:.1f} img/s (x{s['maps_ratio_to_bare']:.2f} the time) | QualityScorer.score "
              f"{s['score_images_per_s']:.1f} img/s (x{s['score_ratio_to_bare']:.2f}) | peak {s['score_peak_gb']} GB",
              flush=True)
    if not args.skip_refine:
        r = bench_refine(args, device, scorer)
        result["refine"] = r
        print(f"refine {r['resolution']}x{r['resolution']} {r['steps_planned']['stage1']}+{r['steps_planned']['stage2']} "
              f"steps: bare diffusers {r['bare_s_per_image']:.3f} s/img | G-Refine {r['grefine_s_per_image']:.3f} s/img "
              f"(x{r['grefine_ratio_to_bare']:.2f}) | with guard {r['grefine_guard_s_per_image']:.3f} s/img | "
              f"peak {r['peak_gb']} GB | build {r['load_s']:.1f} s", flush=True)
    result["wall_s"] = round(time.perf_counter() - wall0, 2)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return result


def _versions(*names: str) -> dict:
    from importlib import metadata

    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
