"""Throughput and memory of the curation job (``grefine-curate run``, score mode, tiny preset).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/job_throughput.py [--n 1000] [--rss-n 10000] [--no-ray]

1. Data: N JPEG images (256x256, smooth synthetic scenes, quality 90) with prompts, in 4 Parquet
   shards (row groups of 64).
2. Bare loop, one process: read the shards by batches, decode (the job's decode, same JPEG draft
   size), one scorer forward (PQ-Map + AQ-Map), write id/prompt/scores with a ParquetWriter.
3. ``run_job`` with the local executor, same data and batch size.
4. ``run_job`` on Ray (a local instance started before timing; the actors' model loading is
   excluded too, as the job's own ``items_per_s`` does).
   Model loading is excluded everywhere: each figure is images / second of steady work.
5. Peak RSS (ru_maxrss) of a fresh process running the local job over N and over RSS_N images
   (goal: <= 1.15x, i.e. memory does not grow with the data set).

Last line: ``ratio: <bare throughput / local-executor throughput>`` (goal <= 1.25; Ray goal: >= 0.7x bare).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red car parked on a quiet street", "a cat sleeping on a blue sofa", "two dogs playing in the snow",
           "a bowl of fruit with a green apple", "a lighthouse at sunset over the sea",
           "a portrait of an old man with a white beard", "a mountain lake surrounded by pine trees",
           "a bicycle leaning against a brick wall"]
BATCH = 16


def make_images(n: int, seed: int = 0) -> list[bytes]:
    """Smooth synthetic 256x256 scenes (gradients, discs, mild noise) as JPEG q90 (~10-20 KB each)."""
    import io

    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32) / 255.0
    out = []
    for _ in range(n):
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (xx * rng.uniform(0, 1) + yy * rng.uniform(0, 1))[..., None] / 2
        arr = c0 * (1 - t) + c1 * t + rng.normal(0, 6, (256, 256, 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(3):
            x, y, r = rng.integers(0, 256, 2).tolist() + [int(rng.integers(10, 60))]
            d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_shards(root: str, n: int, shards: int = 4) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(root, exist_ok=True)
    per = (n + shards - 1) // shards
    paths = []
    pool = make_images(min(n, 500))  # distinct images up to 500, then reused (generation is not what we measure)
    for s in range(shards):
        lo, hi = s * per, min(n, (s + 1) * per)
        path = os.path.join(root, f"shard-{s:05d}.parquet")
        pq.write_table(pa.table({
            "image": pa.array([pool[i % len(pool)] for i in range(lo, hi)], pa.binary()),
            "prompt": [PROMPTS[i % len(PROMPTS)] for i in range(lo, hi)],
        }), path, row_group_size=64)
        paths.append(path)
    return paths


def bare_loop(paths: list[str], out_dir: str) -> tuple[int, float]:
    """Decode + one scorer forward + Parquet write, single process, no job machinery."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from grefine_curate.curate.config import load_preset
    from grefine_curate.curate.errors import ImageError
    from grefine_curate.curate.images import decode_image
    from grefine_curate.curate.scorer import QualityScorer

    preset = load_preset("tiny")
    scorer = QualityScorer(preset)
    draft = (preset.clip.image_size, preset.clip.image_size)
    scorer.score([decode_image(pq.read_table(paths[0]).column("image")[0].as_py())], [PROMPTS[0]])  # warm-up
    os.makedirs(out_dir, exist_ok=True)
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("pq_score", pa.float32()),
                        ("aq_score", pa.float32()), ("unmatched_phrases", pa.list_(pa.string()))])
    n = 0
    t0 = time.perf_counter()
    for path in paths:
        with pq.ParquetWriter(os.path.join(out_dir, os.path.basename(path)), schema) as w:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH):
                raws, prompts = batch.column("image").to_pylist(), batch.column("prompt").to_pylist()
                imgs, keep = [], []
                for i, raw in enumerate(raws):
                    try:
                        imgs.append(decode_image(raw, max_pixels=preset.max_pixels, draft_size=draft))
                        keep.append(i)
                    except ImageError:
                        pass
                res = scorer.score(imgs, [prompts[i] for i in keep])
                w.write_table(pa.table({
                    "id": [f"{path}#{n + i}" for i in keep],
                    "prompt": [prompts[i] for i in keep],
                    "pq_score": pa.array([r.pq.p for r in res], pa.float32()),
                    "aq_score": pa.array([r.aq.a if r.aq else None for r in res], pa.float32()),
                    "unmatched_phrases": [r.aq.unmatched if r.aq else [] for r in res],
                }, schema=schema))
                n += batch.num_rows
    return n, time.perf_counter() - t0


def job(paths_dir: str, out: str, executor: str, workers: int | None = None, unit_rows: int | None = None):
    from grefine_curate.pipelines.job import JobConfig, run_job

    return run_job(JobConfig(inputs=[paths_dir], out=out, preset="tiny", mode="score", executor=executor,
                             workers=workers, batch_size=BATCH, quiet=True, unit_rows=unit_rows))


RSS_SCRIPT = """
import resource, sys, json
from grefine_curate.pipelines.job import JobConfig, run_job
s = run_job(JobConfig(inputs=[sys.argv[1]], out=sys.argv[2], preset="tiny", mode="score", executor="local",
                      batch_size=%d, quiet=True))
print(json.dumps({"rows": s.rows, "exit": s.exit_code, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "items_per_s": s.items_per_s}))
""" % BATCH


def peak_rss(inp: str, out: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.path.join(ROOT, "src")}
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, inp, out], env=env, capture_output=True, text=True,
                       check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="images for the throughput runs")
    ap.add_argument("--rss-n", type=int, default=10000, help="images of the large peak-RSS run (0 = skip)")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray run")
    ap.add_argument("--rounds", type=int, default=3, help="alternating bare/local rounds (best of each)")
    ap.add_argument("--workers", type=int, default=None, help="Ray actors (default: the job's default)")
    ap.add_argument("--unit-rows", type=int, default=None,
                    help="rows per work unit (default: the preset's; 64 splits each shard into 4 units with parts)")
    ap.add_argument("--dir", default=None, help="working directory (default: a temporary one, removed after)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.dir or tempfile.mkdtemp(prefix="grefine-bench-job-")
    try:
        # 1. Data
        t = time.perf_counter()
        paths = write_shards(os.path.join(work, "in"), args.n)
        print(f"data: {args.n} JPEG 256x256 in {len(paths)} shards ({time.perf_counter() - t:.1f}s to build)")
        # 2-3. Bare loop and local executor, alternating rounds (best of each: the machine is shared)
        bare, local = 0.0, 0.0
        for r in range(args.rounds):
            n, dt = bare_loop(paths, os.path.join(work, f"bare{r}"))
            print(f"round {r + 1}: bare loop      {n} images in {dt:.2f}s = {n / dt:.1f} img/s")
            bare = max(bare, n / dt)
            # the local executor's models load before timing: items_per_s excludes start-up
            s = job(os.path.join(work, "in"), os.path.join(work, f"local{r}"), "local", unit_rows=args.unit_rows)
            assert s.exit_code == 0 and s.rows == args.n, s.lines()
            print(f"round {r + 1}: local executor {s.rows} images in {s.wall_s - s.startup_s:.2f}s = "
                  f"{s.items_per_s:.1f} img/s ({s.units_run} work units; model loading {s.startup_s:.1f}s excluded)")
            local = max(local, s.items_per_s)
        print(f"bare loop:      {bare:.1f} img/s (best of {args.rounds})")
        print(f"local executor: {local:.1f} img/s (best of {args.rounds}) = {local / bare:.2f}x bare")
        # 4. Ray
        if not args.no_ray:
            import ray

            t = time.perf_counter()
            ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                     _temp_dir=tempfile.mkdtemp(prefix="grefine-ray-", dir="/tmp"))
            init = time.perf_counter() - t
            s = job(os.path.join(work, "in"), os.path.join(work, "ray"), "ray", args.workers, args.unit_rows)
            ray.shutdown()
            assert s.exit_code == 0 and s.rows == args.n, s.lines()
            print(f"ray executor:   {s.rows} images in {s.wall_s - s.startup_s:.2f}s = {s.items_per_s:.1f} img/s "
                  f"({s.items_per_s / bare:.2f}x bare; ray.init {init:.1f}s and actor start-up {s.startup_s:.1f}s "
                  f"excluded; {json.load(open(os.path.join(work, 'ray', '__grefine__', 'manifest.json')))['run']['workers']} "
                  "worker(s))")
        # 5. Peak RSS, small vs large data set (fresh processes)
        if args.rss_n:
            small = peak_rss(os.path.join(work, "in"), os.path.join(work, "rss-small"))
            big_in = os.path.join(work, "in-big")
            write_shards(big_in, args.rss_n)
            big = peak_rss(big_in, os.path.join(work, "rss-big"))
            shutil.rmtree(big_in, ignore_errors=True)
            print(f"peak RSS: {small['maxrss_kb'] / 1024:.0f} MB at {small['rows']} images, "
                  f"{big['maxrss_kb'] / 1024:.0f} MB at {big['rows']} images "
                  f"= {big['maxrss_kb'] / small['maxrss_kb']:.3f}x (goal <= 1.15)")
        print(f"ratio: {bare / local:.3f}")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
