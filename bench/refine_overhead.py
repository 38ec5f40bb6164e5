"""Balanced-refiner overhead against calling the two diffusers pipelines directly (issue 4, Benchmark).

Tiny random-weight SDXL-shaped pipelines (the ``tiny`` preset's), CPU, a small batch of 64x64 images
(the tiny model's resolution) on route ``full``, n = ``--steps`` iterations split in half:

* direct:  ``stage1(prompt, image, mask_image, strength=s1, num_inference_steps=N1)`` on the batch, then
           ``stage2(prompt, image=<stage-1 images>, strength=delta, num_inference_steps=N2)``
* refiner: ``BalancedRefiner.refine(items)`` (guard off): routing, mask from the maps (threshold,
           dilation, feathering), step planning, prompt encoding, both stages, paste-back through the
           feathered mask, conversion back to PIL at the original size

Both get the same images, masks (the refiner's own binary mask is handed to the direct calls),
prompts, per-item seeds and step counts; the UNet calls of both are counted and must match. Each is
timed ``--runs`` times in the same process, alternating, after a warm-up; medians are compared. The
last line is ``ratio: <refiner time / direct time>`` (goal: <= 1.1).

    HF_HUB_OFFLINE=1 python bench/refine_overhead.py [--runs 5] [--batch 4] [--steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np
import torch
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs of each (median reported)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20, help="n: total denoising steps (paper: 20)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a small shared machine OpenMP spinning dominates)")
    args = ap.parse_args()

    from grefine_curate.curate.config import load_preset
    from grefine_curate.curate.diffusion_models import load_refiner_pipelines
    from grefine_curate.curate.masks import build_mask, split_steps, stage1_strength
    from grefine_curate.curate.refiner import BalancedRefiner, RefineItem, item_seed

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = load_preset("tiny")
    cfg = replace(preset.refiner, guard=False, steps=args.steps)
    stage1, stage2 = load_refiner_pipelines(cfg, device="cpu")
    res = cfg.resolution

    rng = np.random.default_rng(0)
    prompts = ["a cat in a red hat", "a lighthouse at dusk", "two apples on a table", "a robot reading"]
    items = []
    for i in range(args.batch):
        image = Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8), "RGB")
        P = np.clip(rng.normal(0.7, 0.2, (res, res)), 0, 1).astype(np.float32)
        P[res // 8: res // 3, res // 4: res // 2] = 0.1  # a low-quality region
        A = np.zeros((res, res), np.float32)
        items.append(RefineItem(image=image, prompt=prompts[i % len(prompts)], p=0.3, a=0.35, P=P, A=A,
                                seed=item_seed(preset.seed, f"bench-{i}"), route="full"))
    inside = {"t": 0.0}

    class Timed:
        """The pipeline, with the time spent inside its ``__call__`` added up (the refiner's own work
        is the rest)."""

        def __init__(self, pipe):
            self.pipe = pipe

        def __getattr__(self, name):
            return getattr(self.pipe, name)

        def __call__(self, *a, **kw):
            t0 = time.perf_counter()
            try:
                return self.pipe(*a, **kw)
            finally:
                inside["t"] += time.perf_counter() - t0

    refiner = BalancedRefiner(cfg, preset.routing, pipelines=(Timed(stage1), Timed(stage2)), max_batch=args.batch)

    s1 = stage1_strength(0.3, 0.35, cfg)
    plan = split_steps(cfg.steps, cfg.stage1_fraction, s1, cfg.delta)
    masks = [Image.fromarray(build_mask(it.P, it.A, cfg.mask).astype(np.uint8) * 255, "L") for it in items]
    images = [it.image for it in items]
    texts = [it.prompt for it in items]

    def generators(stage: int) -> list[torch.Generator]:
        return [torch.Generator("cpu").manual_seed(item_seed(it.seed, f"stage{stage}")) for it in items]

    def direct() -> list[Image.Image]:
        out = stage1(prompt=texts, image=images, mask_image=masks, height=res, width=res, strength=s1,
                     num_inference_steps=plan.steps1, guidance_scale=cfg.guidance_scale,
                     generator=generators(1)).images
        return stage2(prompt=texts, image=out, strength=cfg.delta, num_inference_steps=plan.steps2,
                      guidance_scale=cfg.stage2_guidance_scale, generator=generators(2)).images

    def refined() -> list[Image.Image]:
        outs = refiner.refine(items)
        assert all(o.route == "full" for o in outs), [o.route for o in outs]
        return [o.image for o in outs]

    calls = {"n": 0}
    hooks = [p.unet.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1)) for p in (stage1, stage2)]
    counted = {}
    for name, fn in (("direct", direct), ("refiner", refined)):  # warm-up + same work check
        calls["n"] = 0
        fn()
        counted[name] = calls["n"]
    for h in hooks:
        h.remove()
    assert counted["direct"] == counted["refiner"] == plan.n1 + plan.n2, counted

    times: dict[str, list[float]] = {"direct": [], "refiner": []}
    own: list[float] = []  # refiner time outside the two diffusers calls
    for _ in range(args.runs):
        for name, fn in (("direct", direct), ("refiner", refined)):
            inside["t"] = 0.0
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            if name == "refiner":
                own.append(times[name][-1] - inside["t"])
    t_direct, t_refiner = statistics.median(times["direct"]), statistics.median(times["refiner"])
    print(f"device: cpu, torch threads: {torch.get_num_threads()}, batch {args.batch} at {res}x{res}, "
          f"n = {cfg.steps} (n1 = {plan.n1} at num_inference_steps {plan.steps1}, n2 = {plan.n2} at "
          f"{plan.steps2}), {args.runs} runs each; UNet calls per run: {counted['refiner']}")
    for label, name, t_med in (("direct pipelines", "direct", t_direct), ("balanced refiner", "refiner", t_refiner)):
        runs = ", ".join(f"{t * 1000:.0f}" for t in times[name])
        print(f"{label}: median {t_med * 1000:.0f} ms  (runs: {runs})")
    print(f"refiner's own work outside the diffusers calls (routing, masks, prompt encoding, resizes, "
          f"paste-back): median {statistics.median(own) * 1000:.1f} ms")
    print(f"ratio of the fastest runs (less sensitive to a busy machine): "
          f"{min(times['refiner']) / min(times['direct']):.3f}")
    print(f"ratio: {t_refiner / t_direct:.3f}")


if __name__ == "__main__":
    main()
