"""PQ-Map + AQ-Map overhead against a bare CLIP image embedding (issue: AQ-Map, Benchmark).

Random-weight open_clip ViT-B-16 (QuickGELU, as OpenAI's), a batch of 8 images at 224x224 with 8
different prompts:

* bare:     ``model.encode_image(pixels)``
* PQ + AQ:  ONE surgery forward shared by both maps, then ``PQMap.from_tokens`` (four factors, cask,
            map P at 512x512) and ``AQMap.from_tokens`` (spaCy parse of the 8 prompts, phrase and
            noun features, defects, map A at 512x512, score a)

AQ is timed twice: *cold* (empty text-feature cache: every prompt, phrase and noun goes through the
text encoder with the template ensemble, one run) and *warm* (the phrases already cached, as in a
real data set where phrases repeat; the prompts are still parsed on every run -- the parse cache is
cleared -- because real prompts differ). Bare and warm runs alternate after a warm-up; medians are
compared. The last line is ``ratio: <warm PQ+AQ time / bare time>`` (goal: <= 1.5).

    HF_HUB_OFFLINE=1 python bench/aq_overhead.py [--runs 7] [--templates imagenet|single] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import add_common_args, random_vit_b16, sync

PROMPTS = [
    "Mr. Beans wearing sun glasses with blue doctor suit and stripe tie",
    "a cat sitting on a red sofa in a living room",
    "(masterpiece:1.2), best quality, 1girl, solo, long hair, blue eyes, school uniform, cherry blossoms",
    "a photo of an astronaut riding a horse on mars, highly detailed, 8k",
    "cyberpunk city at night, neon lights, rain, [flying cars|drones], <lora:cyber:0.7>",
    "a bowl of soup that looks like a monster, knitted out of wool",
    "portrait of an old fisherman with a white beard, oil painting by rembrandt",
    "a red car next to a tall tree under a cloudy sky BREAK golden hour",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="timed runs of bare and warm PQ+AQ (median reported)")
    ap.add_argument("--templates", default="imagenet", help="AQ text templates: imagenet (85, default) | single")
    add_common_args(ap)
    args = ap.parse_args()

    from grefine_curate.curate.aq_map import AQMap
    from grefine_curate.curate.config import AQConfig
    from grefine_curate.curate.syntax import load_spacy

    device, clip, pq = random_vit_b16(args)
    model = clip.model
    aq = AQMap(clip, AQConfig(templates=args.templates), nlp=load_spacy("en_core_web_sm"),
               image_size=224, surgery_blocks=6)
    batch = len(PROMPTS)
    pixels = torch.randn(batch, 3, 224, 224, device=device)
    sizes = [(args.map_size, args.map_size)] * batch

    def bare() -> None:
        with torch.no_grad():
            model.encode_image(pixels)
        sync(device)

    def full() -> list:
        aq._parsed.clear()  # real prompts differ: parse every time; only phrase features are reused
        with torch.no_grad():
            tokens = pq.encoder(pixels)  # (B, 1+HW, D): the one forward both maps read
            pq_res = pq.from_tokens(tokens, sizes)
            aq_res = aq.from_tokens(tokens, sizes, PROMPTS)
        assert pq_res[0].P.shape == aq_res[0].A.shape == (args.map_size, args.map_size)
        sync(device)
        return aq_res

    bare()
    bare()
    t0 = time.perf_counter()
    cold_results = full()  # cold: empty text cache
    t_cold = time.perf_counter() - t0
    cold_stats = aq.cache.stats()
    full()  # warm-up of the warm path
    times: dict[str, list[float]] = {"bare": [], "warm": []}
    for _ in range(args.runs):
        for name, fn in (("bare", bare), ("warm", full)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    with torch.no_grad():
        tokens = pq.encoder(pixels)
    head = []
    for _ in range(args.runs):  # the AQ head alone on precomputed tokens (parse + features + maps)
        aq._parsed.clear()
        t0 = time.perf_counter()
        aq.from_tokens(tokens, sizes, PROMPTS)
        head.append(time.perf_counter() - t0)
    t_bare, t_warm = statistics.median(times["bare"]), statistics.median(times["warm"])
    n_phrases = sum(len(r.phrases) for r in cold_results)
    n_defects = sum(len(r.unmatched) for r in cold_results)
    print(f"device: {device}, torch threads: {torch.get_num_threads()}, batch {batch} at 224, "
          f"maps at {args.map_size}x{args.map_size}, templates {args.templates}, {args.runs} runs each")
    print(f"AQ texts: {cold_stats['misses']} unique texts (+ the redundant \"\") encoded cold in "
          f"{cold_stats['forwards']} text-encoder forward(s); {n_phrases} phrases, {n_defects} unmatched (random weights)")
    print(f"bare encode_image:  median {t_bare * 1000:.1f} ms  (runs: {', '.join(f'{t * 1000:.0f}' for t in times['bare'])})")
    print(f"PQ+AQ cold cache:   {t_cold * 1000:.1f} ms  (one run)  cold ratio: {t_cold / t_bare:.2f}")
    print(f"PQ+AQ warm cache:   median {t_warm * 1000:.1f} ms  (runs: {', '.join(f'{t * 1000:.0f}' for t in times['warm'])})")
    print(f"AQ head alone, warm (tokens given): median {statistics.median(head) * 1000:.1f} ms")
    print(f"ratio: {t_warm / t_bare:.3f}")


if __name__ == "__main__":
    main()
