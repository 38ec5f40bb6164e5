"""PQ-Map overhead against a bare CLIP image embedding (issue: Foundation and PQ-Map, Benchmark).

Random-weight open_clip ViT-B-16 (QuickGELU, as OpenAI's), a batch of 8 images at 224x224:

* bare:   ``model.encode_image(pixels)``
* PQ-Map: surgery forward (last 6 blocks dual path), four factor scores, cask, and the four-factor
          map P resized to 512x512 for every image (what ``PQMap.from_tokens`` returns)

Both start from the same preprocessed pixel tensor; each is timed ``--runs`` times in the same
process, alternating, after a warm-up; the medians are compared. The last line is
``ratio: <PQ-Map time / bare time>`` (goal: <= 1.3).

    HF_HUB_OFFLINE=1 python bench/pq_overhead.py [--runs 7] [--threads N] [--device cpu] [--clock wall]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="timed runs of each (median reported)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--map-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="clock of the ratio line: wall time, or process CPU time (CPU only; steadier on a shared machine)")
    args = ap.parse_args()

    import open_clip

    from grefine_curate.curate.clip_models import CLIP_MEAN, CLIP_STD, ClipBundle
    from grefine_curate.curate.config import PQConfig
    from grefine_curate.curate.pq_map import PQMap

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).to(device).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    clip = ClipBundle(model=model, tokenizer=open_clip.get_tokenizer("ViT-B-16-quickgelu"), mean=CLIP_MEAN,
                      std=CLIP_STD, device=device, dtype=torch.float32, name="ViT-B-16-quickgelu/random")
    # The released prompts (width 512) exercise the learned-context text path; T_p is computed once
    # at construction, as in a curation job, so it is outside the timed region.
    pq = PQMap(clip, PQConfig(prompts="reference-pq"), surgery_blocks=6, image_size=224)
    pixels = torch.randn(args.batch, 3, 224, 224, device=device)
    sizes = [(args.map_size, args.map_size)] * args.batch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def bare() -> None:
        with torch.no_grad():
            model.encode_image(pixels)
        sync()

    def full() -> None:
        with torch.no_grad():
            results = pq.from_tokens(pq.encoder(pixels), sizes)
        assert results[0].P.shape == (args.map_size, args.map_size), "map not at the requested size"
        sync()

    for fn in (bare, full, bare, full):  # warm-up (allocator, kernels, thread pool)
        fn()
    wall: dict[str, list[float]] = {"bare": [], "full": []}
    cpu: dict[str, list[float]] = {"bare": [], "full": []}
    for _ in range(args.runs):
        for name, fn in (("bare", bare), ("full", full)):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    print(f"device: {device}, torch threads: {torch.get_num_threads()}, batch {args.batch} at 224, "
          f"maps at {args.map_size}x{args.map_size}, {args.runs} runs each, alternating")
    if device.type == "cpu":
        # On a shared CPU, wall time swings with other processes; process CPU time is the steadier
        # view of the same work (informational; the ratio line uses --clock).
        print(f"cpu time: bare median {statistics.median(cpu['bare']) * 1000:.1f} ms, PQ-Map median "
              f"{statistics.median(cpu['full']) * 1000:.1f} ms, ratio "
              f"{statistics.median(cpu['full']) / statistics.median(cpu['bare']):.3f}")
    times = cpu if args.clock == "cpu" else wall
    t_bare, t_full = statistics.median(times["bare"]), statistics.median(times["full"])
    print(f"bare encode_image: median {t_bare * 1000:.1f} ms  ({args.clock}; runs: {', '.join(f'{t * 1000:.0f}' for t in times['bare'])})")
    print(f"PQ-Map full:       median {t_full * 1000:.1f} ms  ({args.clock}; runs: {', '.join(f'{t * 1000:.0f}' for t in times['full'])})")
    print(f"ratio: {t_full / t_bare:.3f}")


if __name__ == "__main__":
    main()
