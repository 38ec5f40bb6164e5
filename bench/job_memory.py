"""Peak memory of the job on one batch of 8 images at the pixel limit, score and refine mode (issue 15, item 11).

    .venv/bin/python bench/job_memory.py [--max-pixels 16777216] [--batch 8] [--modes refine,score] [--image jpeg]

1. An image folder of ``--batch`` images of exactly ``--max-pixels`` pixels (``--image``: JPEG quality
   90, or one of ``decode_memory.py``'s cases: jpeg-exif6, png, png-rgba, png-16bit), with a
   four-phrase prompt each in ``metadata.jsonl`` (so AQ-Map draws per-phrase maps), and a warm-up
   folder of the same prompts at 256x256.
2. In a fresh process per mode: ``run_job`` (local executor, tiny preset, batch size ``--batch``,
   ``max_pixels`` = ``--max-pixels``) on the warm-up folder, which loads the models and runs every
   code path once (routing thresholds of 1.0 send every image through both refinement stages). The
   RSS then is "the models" (minus the RSS before loading them: ``models``). The peak RSS is reset
   to it (``/proc/self/clear_refs``; Linux only) and ``run_job`` runs on the big folder.
   Growth = peak RSS (``VmHWM``) - RSS after the warm-up; decoded = batch x pixels x 3 bytes.

Each mode prints ``growth / decoded``; the last line is ``ratio: <the worse mode>``. The goal
(issue 15) is a peak within 1.5x of the images' decoded size plus the models, i.e. growth / decoded
<= 1.5. PIL holds RGB at 4 bytes a pixel, so a job holding the whole batch decoded would start at
1.33x; the job's pixel budget (``pipelines/pixel_budget.py``) holds two images at the limit
(at batch sizes up to 64, where two batches of 1024x1024 images are smaller than that). The growth also counts the batch's encoded input bytes and encoded outputs. ``--max-pixels
67108864`` is the presets' limit (8 x 192 MB = 1.5 GB decoded; a minute a mode for JPEGs on 2
cores, a few for PNGs, whose outputs are PNG-encoded at 64 MP).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [
    "a red car next to a blue house under a green tree with a yellow dog",
    "an old wooden boat on a calm lake beside a snowy mountain at sunset",
    "a small cat sleeping on a soft pillow near a bright window with flowers",
    "a tall lighthouse on a rocky coast with white waves and a grey sky",
]

SCRIPT = """
import json, sys
from grefine_curate.pipelines.job import JobConfig, run_job

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

warm, big, out, mode, batch, max_pixels = sys.argv[1:7]
routing = {"skip_p": 1.0, "skip_a": 1.0, "light_p": 1.0, "light_a": 1.0}  # every image refined (full)

def job(inp, out_dir):
    return run_job(JobConfig(inputs=[inp], out=out_dir, preset="tiny", mode=mode, executor="local",
                             batch_size=int(batch), quiet=True, write_report=False,
                             overrides={"max_pixels": int(max_pixels), "routing": routing}))

before = status("VmRSS")
w = job(warm, out + "-warm")
models = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS: the warm-up peaked higher
base = status("VmRSS")
s = job(big, out)
peak = status("VmHWM")
print(json.dumps({"before_kb": before, "models_kb": models, "base_kb": base, "peak_kb": peak,
                  "rows": s.rows, "exit": s.exit_code, "routes": s.routes, "status": s.status,
                  "warm_routes": w.routes}))
"""


def make_image(kind: str, pixels: int, seed: int) -> tuple[bytes, str]:
    """An image of ``pixels`` pixels (smooth gradients plus row noise) and its file extension."""
    from decode_memory import make_image as make_case  # bench/ is the script's folder

    return make_case(kind, pixels, seed), ("jpg" if kind.startswith("jpeg") else "png")


def make_folder(path: str, n: int, pixels: int, kind: str = "jpeg") -> int:
    os.makedirs(path)
    total = 0
    with open(os.path.join(path, "metadata.jsonl"), "w") as meta:
        for i in range(n):
            data, ext = make_image(kind, pixels, i)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
            name = f"img{i:02d}.{ext}"
            with open(os.path.join(path, name), "wb") as f:
                f.write(data)
            meta.write(json.dumps({"file_name": name, "prompt": PROMPTS[i % len(PROMPTS)]}) + "\n")
            total += w * h
    return total


def measure(warm: str, big: str, out: str, mode: str, batch: int, max_pixels: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.path.join(ROOT, "src")}
    r = subprocess.run([sys.executable, "-c", SCRIPT, warm, big, out, mode, str(batch), str(max_pixels)],
                       env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-pixels", type=int, default=4096 * 4096, help="the pixel limit; every image is this size")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--modes", default="refine,score")
    ap.add_argument("--image", default="jpeg", help="jpeg, jpeg-exif6, png, png-rgba or png-16bit")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="grefine-bench-jobmem-")
    worst = 0.0
    try:
        t = time.perf_counter()
        make_folder(os.path.join(work, "warm"), args.batch, 256 * 256, args.image)
        pixels = make_folder(os.path.join(work, "big"), args.batch, args.max_pixels, args.image)
        decoded = 3 * pixels
        print(f"{args.batch} images ({args.image}) of {pixels // args.batch} pixels: decoded {decoded / 2**20:.0f} MB "
              f"(3 bytes a pixel); made in {time.perf_counter() - t:.1f}s")
        for mode in args.modes.split(","):
            t = time.perf_counter()
            r = measure(os.path.join(work, "warm"), os.path.join(work, "big"), os.path.join(work, f"out-{mode}"),
                        mode, args.batch, args.max_pixels)
            if r["rows"] != args.batch or r["status"].get("ok", 0) != args.batch:
                raise SystemExit(f"{mode}: expected {args.batch} ok rows, got {r['status']} (exit {r['exit']})")
            growth = (r["peak_kb"] - r["base_kb"]) * 1024
            ratio = growth / decoded
            worst = max(worst, ratio)
            models = (r["models_kb"] - r["before_kb"]) * 1024
            print(f"{mode}: models {models / 2**20:.0f} MB, routes {r['routes']}, peak RSS growth "
                  f"{growth / 2**20:.0f} MB: {ratio:.2f}x decoded ({time.perf_counter() - t:.1f}s)")
            shutil.rmtree(os.path.join(work, f"out-{mode}"), ignore_errors=True)
        print(f"ratio: {worst:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
