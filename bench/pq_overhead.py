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

from _common import add_common_args, random_vit_b16, sync


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="timed runs of each (median reported)")
    ap.add_argument("--batch", type=int, default=8)
    add_common_args(ap)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="clock of the ratio line: wall time, or process CPU time (CPU only; steadier on a shared machine)")
    args = ap.parse_args()

    device, clip, pq = random_vit_b16(args)
    model = clip.model
    pixels = torch.randn(args.batch, 3, 224, 224, device=device)
    sizes = [(args.map_size, args.map_size)] * args.batch

    def bare() -> None:
        with torch.no_grad():
            model.encode_image(pixels)
        sync(device)

    def full() -> None:
        with torch.no_grad():
            results = pq.from_tokens(pq.encoder(pixels), sizes)
        assert results[0].P.shape == (args.map_size, args.map_size), "map not at the requested size"
        sync(device)

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
