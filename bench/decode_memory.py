"""Peak memory of decoding one batch of 8 images at the pixel limit (issue 15, item 11).

    .venv/bin/python bench/decode_memory.py [--max-pixels 4194304] [--batch 8] [--cases jpeg,jpeg-exif6,...]

1. For each case, ``--batch`` images of exactly ``--max-pixels`` pixels (a square, or a 2:1 image
   for the rotated case) are encoded and written to a temporary directory: JPEG (quality 90), a
   JPEG stored sideways with EXIF orientation 6 (decoded upright: a transpose), PNG RGB, PNG RGBA (alpha
   composited on white), 16-bit grey PNG (scaled to 8 bits) and a PNG with an 8 MB ICC profile.
2. In a fresh process per case: the encoded bytes are read into memory (a batch's input, as the
   job holds it), the peak RSS is reset to the current RSS (``/proc/self/clear_refs``; Linux only:
   importing the package peaks higher than a batch of small images) and taken as the baseline,
   then every image of the batch is decoded with ``decode_image(max_pixels=...)`` and kept (a batch
   waits for the models whole). Growth = peak RSS (``VmHWM``) - baseline; decoded = batch x pixels
   x 3 bytes (8-bit RGB).

Each case prints ``growth / decoded``; the last line is ``ratio: <the worst case>``. PIL keeps an
RGB image at 4 bytes a pixel (RGBX), so a batch of decoded PIL images is 1.33x its 3-byte size:
that is the floor; what lies above it is the conversion's transient copies of one image. The goal
(issue 15) is within 1.5x of the images' decoded size plus the models; the models are a constant
not loaded here, so the ratio is that of the decoding alone. The default limit (4 MP, 96 MB per
batch) keeps the run to seconds on a shared CPU; ``--max-pixels 67108864`` is the presets' limit
(8 x 192 MB = 1.5 GB decoded).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ("jpeg", "jpeg-exif6", "png", "png-rgba", "png-16bit", "png-icc8mb")

SCRIPT = """
import json, sys
from grefine_curate.curate.images import decode_image

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

paths, max_pixels = sys.argv[1].split(","), int(sys.argv[2])
data = [open(p, "rb").read() for p in paths]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS: imports may have peaked higher
base = status("VmRSS")
batch = [decode_image(d, name=p, max_pixels=max_pixels) for d, p in zip(data, paths)]
peak = status("VmHWM")
print(json.dumps({"base_kb": base, "peak_kb": peak, "sizes": [im.size for im in batch],
                  "modes": sorted({im.mode for im in batch})}))
"""


def make_image(case: str, pixels: int, seed: int) -> bytes:
    """One encoded image of ``pixels`` pixels: smooth gradients plus noise (JPEG-like content)."""
    rng = np.random.default_rng(seed)
    if case == "jpeg-exif6":
        h = int(math.isqrt(pixels // 2))
        w = pixels // h  # stored 2:1, displayed 1:2
    else:
        w = h = int(math.isqrt(pixels))
    grad = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1.0, (1, 1, 3)).astype(np.float32)
    rgb = np.clip(grad + rng.normal(0, 10, (h, 1, 3)).astype(np.float32), 0, 255).astype(np.uint8)
    rgb = np.ascontiguousarray(np.broadcast_to(rgb, (h, w, 3)))
    buf = io.BytesIO()
    if case == "jpeg":
        Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    elif case == "jpeg-exif6":
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(rgb).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    elif case == "png":
        Image.fromarray(rgb).save(buf, "PNG", compress_level=1)
    elif case == "png-rgba":
        alpha = np.full((h, w, 1), 128, np.uint8)
        Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA").save(buf, "PNG", compress_level=1)
    elif case == "png-16bit":
        grey = (rgb[..., 0].astype(np.uint16) * 257)
        Image.fromarray(grey).save(buf, "PNG", compress_level=1)
    elif case == "png-icc8mb":
        icc = rng.integers(0, 255, 8 << 20, dtype=np.uint8).tobytes()
        Image.fromarray(rgb).save(buf, "PNG", compress_level=1, icc_profile=icc)
    else:
        raise ValueError(f"unknown case {case!r}; known: {', '.join(CASES)}")
    return buf.getvalue()


def measure(paths: list[str], max_pixels: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    r = subprocess.run([sys.executable, "-c", SCRIPT, ",".join(paths), str(max_pixels)], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-pixels", type=int, default=2048 * 2048, help="the pixel limit; every image is this size")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="grefine-bench-decode-")
    worst = 0.0
    try:
        for case in args.cases.split(","):
            t = time.perf_counter()
            paths = []
            for i in range(args.batch):
                path = os.path.join(work, f"{case}-{i}")
                with open(path, "wb") as f:
                    f.write(make_image(case, args.max_pixels, i))
                paths.append(path)
            encoded = sum(os.path.getsize(p) for p in paths)
            r = measure(paths, args.max_pixels)
            pixels = sum(w * h for w, h in r["sizes"])
            decoded = 3 * pixels
            growth = (r["peak_kb"] - r["base_kb"]) * 1024
            ratio = growth / decoded
            worst = max(worst, ratio)
            print(f"{case}: {args.batch} x {r['sizes'][0][0]}x{r['sizes'][0][1]} {r['modes']}, encoded "
                  f"{encoded / 2**20:.0f} MB, decoded {decoded / 2**20:.0f} MB, peak RSS growth "
                  f"{growth / 2**20:.0f} MB: {ratio:.2f}x ({time.perf_counter() - t:.1f}s)")
            for p in paths:
                os.remove(p)
        print(f"ratio: {worst:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
