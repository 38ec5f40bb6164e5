"""Fast decoding for scoring (issue 6): full JPEG decode + resize vs reduced-size decode + resize.

Scoring (PQ-Map, AQ-Map) needs 224x224 inputs. A JPEG can be decoded at 1/2, 1/4 or 1/8 scale by
libjpeg's DCT scaling (PIL draft mode), skipping most of the inverse DCT and colour conversion, and
turning the expensive 1024 -> 224 resize into a 256 -> 224 one. ``decode_image(data,
draft_size=(224, 224))`` picks the smallest scale that keeps both sides >= 224 (1024x1024 ->
256x256), then the usual bicubic resize gives 224x224.

Inputs: 1024x1024 JPEGs (quality ``--quality``) made from scikit-image's sample photographs,
upscaled bicubically. Both paths run the scoring path's own code (``decode_image`` then
``preprocess_images``), back to back, ``--rounds`` times; the ratio is the median of the per-round
ratios (robust to load that drifts during the run on a shared machine).

Also measured: how much the scores move on the tiny preset (same images, fast vs full decode;
``--preset sdxl`` where pretrained weights are available); the goal is < 0.01.
Last line: ``ratio: <full decode time / fast decode time>`` (goal >= 3).

    HF_HUB_OFFLINE=1 python bench/decode.py [--rounds 15] [--repeat 4] [--quality 90] [--preset tiny]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
from PIL import Image

SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "motorcycle_left")


def make_jpegs(size: int, quality: int) -> list[tuple[str, bytes]]:
    from skimage import data as skdata

    out = []
    for name in SAMPLES:
        loader = getattr(skdata, name, None)
        if loader is None:
            continue
        try:
            arr = loader()
        except Exception:  # noqa: BLE001 - a sample that needs a download (pooch) is skipped
            continue
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        img = Image.fromarray(np.ascontiguousarray(arr[..., :3]).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        out.append((name, buf.getvalue()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds of each path (medians reported)")
    ap.add_argument("--repeat", type=int, default=4, help="passes over the image set per round")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for the tensor part (a job decodes on a thread pool)")
    ap.add_argument("--size", type=int, default=1024, help="side of the test JPEGs")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality of the test images")
    ap.add_argument("--draft", type=int, default=224, help="draft_size side asked of the decoder (scoring uses the CLIP input side, 224)")
    ap.add_argument("--preset", default="tiny", help="preset whose scores are compared (tiny: random weights, offline)")
    ap.add_argument("--no-scores", action="store_true", help="skip the score-difference check")
    args = ap.parse_args()

    from grefine_curate.curate.clip_models import CLIP_MEAN, CLIP_STD
    from grefine_curate.curate.images import decode_image
    from grefine_curate.curate.surgery import preprocess_images

    import torch

    torch.set_num_threads(args.threads)
    side = 224
    draft = (args.draft, args.draft)
    jpegs = make_jpegs(args.size, args.quality)
    if not jpegs:
        raise SystemExit("no scikit-image sample could be loaded")
    kb = sum(len(b) for _, b in jpegs) / len(jpegs) / 1024
    print(f"images: {len(jpegs)} JPEGs {args.size}x{args.size} q={args.quality} ({kb:.0f} KB each on average): "
          f"{', '.join(n for n, _ in jpegs)}")
    print(f"fast decode size: {decode_image(jpegs[0][1], draft_size=draft).size} (draft_size={draft})")

    def decode_only(draft_size) -> float:
        t = time.perf_counter()
        for _ in range(args.repeat):
            for _, b in jpegs:
                decode_image(b, draft_size=draft_size)
        return (time.perf_counter() - t) / (args.repeat * len(jpegs))

    def decode_and_resize(draft_size) -> float:
        t = time.perf_counter()
        for _ in range(args.repeat):
            for _, b in jpegs:
                preprocess_images([decode_image(b, draft_size=draft_size)], side, CLIP_MEAN, CLIP_STD)  # (1, 3, 224, 224)
        return (time.perf_counter() - t) / (args.repeat * len(jpegs))

    decode_and_resize(None), decode_and_resize(draft)  # warm-up
    full, fast, full_dec, fast_dec = [], [], [], []
    for _ in range(args.rounds):  # back to back, so background load hits both paths alike
        full.append(decode_and_resize(None))
        fast.append(decode_and_resize(draft))
        full_dec.append(decode_only(None))
        fast_dec.append(decode_only(draft))
    # Median of the per-round ratios: robust to load that drifts over the run (shared machines).
    ratio = statistics.median(a / b for a, b in zip(full, fast))
    ratio_dec = statistics.median(a / b for a, b in zip(full_dec, fast_dec))
    ms = lambda v: f"{statistics.median(v) * 1e3:7.2f} ms (min {min(v) * 1e3:6.2f})"  # noqa: E731
    print(f"decode only:      full {ms(full_dec)}   fast {ms(fast_dec)}   x{ratio_dec:.2f}")
    print(f"decode + resize:  full {ms(full)}   fast {ms(fast)}   x{ratio:.2f}  "
          "(per image, what the scoring path does: decode_image + preprocess_images)")

    if not args.no_scores:
        score_difference(jpegs, draft, args.preset)
    print(f"ratio: {ratio:.2f}")


def score_difference(jpegs: list[tuple[str, bytes]], draft: tuple[int, int], preset_name: str = "tiny") -> None:
    """Max |score(fast decode) - score(full decode)| on a preset, by default tiny (goal < 0.01).

    On the tiny preset p itself is ~1e-18 (random weights: the cask multiplies near-zero factor
    scores), so a difference in p alone would prove nothing; the four factor scores s_i (each a
    probability spread over (0, 1)) and a are compared as well, and the largest difference counts.
    """
    from grefine_curate.curate.config import load_preset
    from grefine_curate.curate.images import decode_image

    preset = load_preset(preset_name)
    full = [decode_image(b) for _, b in jpegs]
    fast = [decode_image(b, draft_size=draft) for _, b in jpegs]
    side = preset.clip.image_size
    px_full = np.stack([np.asarray(i.resize((side, side), Image.BICUBIC), np.float32) for i in full])
    px_fast = np.stack([np.asarray(i.resize((side, side), Image.BICUBIC), np.float32) for i in fast])
    print(f"224x224 inputs: mean |fast - full| = {np.abs(px_fast - px_full).mean():.3f} / 255")
    prompts = ["a photo of an astronaut with a flag", "a cup of coffee on a table", "a cat looking at the camera",
               "a rocket on a launch pad", "a stained tissue sample", "a red motorcycle"][: len(jpegs)]
    try:
        from grefine_curate.curate.scorer import QualityScorer
    except ImportError:
        QualityScorer = None
    if QualityScorer is not None:
        scorer = QualityScorer(preset)
        ra, rb = scorer.score(full, prompts), scorer.score(fast, prompts)
        pqa, pqb = [r.pq for r in ra], [r.pq for r in rb]
        da = max(abs(x.a - y.a) for x, y in zip(ra, rb) if x.a is not None and y.a is not None)
        what = "QualityScorer"
    else:
        from grefine_curate.curate.pq_map import PQMap

        pq = PQMap.from_preset(preset)
        pqa, pqb = pq.score(full), pq.score(fast)
        da = None
        what = "PQ-Map only; curate/scorer.py not there"
    dp = max(abs(x.p - y.p) for x, y in zip(pqa, pqb))
    ds = max(abs(x.factors[k] - y.factors[k]) for x, y in zip(pqa, pqb) for k in x.factors)
    parts = [f"p {dp:.5f}", f"factor scores {ds:.5f}"] + ([f"a {da:.5f}"] if da is not None else [])
    worst = max([dp, ds] + ([da] if da is not None else []))
    print(f"scores ({preset.name} preset, {what}): max |fast - full|: {', '.join(parts)}")
    print(f"max abs score difference: {worst:.5f} (goal < 0.01: {'met' if worst < 0.01 else 'NOT met'})")


if __name__ == "__main__":
    main()
