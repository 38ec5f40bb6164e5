"""Scale-out within one file: the job on Ray with 1 and with 2 CPU workers over ONE Parquet file.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/job_scaling.py [--n 4000] [--rounds 2] [--unit-rows N]

1. Data: one Parquet file of N JPEG images (256x256, bench/job_throughput.py's generator) with
   prompts, row groups of 64 rows.
2. One local Ray instance with 2 CPUs, started before timing.
3. ``run_job`` in score mode, tiny preset, ``--executor ray``: 1 worker, then 2 workers, each worker
   one torch thread (``threads_per_worker=1``), alternating for ``--rounds`` rounds (best of each;
   the machine is shared). Throughput is the job's own ``items_per_s``: rows / (wall time - start-up),
   start-up being Ray's and the actors' model loading.

Before work units, one file could use one worker only (ratio 1.0): units of whole row groups
(``score_unit_rows`` of the preset, or ``--unit-rows``) spread it over both.

Last line: ``ratio: <items/s with 2 workers / items/s with 1>`` (goal >= 1.6 on a 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from job_throughput import PROMPTS, make_images  # noqa: E402  (same data generator)
from grefine_curate.pipelines.paths import STATE_DIR  # noqa: E402

BATCH = 16


def write_file(path: str, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pool = make_images(min(n, 500))  # distinct images up to 500, then reused
    pq.write_table(pa.table({
        "image": pa.array([pool[i % len(pool)] for i in range(n)], pa.binary()),
        "prompt": [PROMPTS[i % len(PROMPTS)] for i in range(n)],
    }), path, row_group_size=64)


def run(inp: str, out: str, workers: int, unit_rows: int | None):
    from grefine_curate.pipelines.job import JobConfig, run_job

    s = run_job(JobConfig(inputs=[inp], out=out, preset="tiny", mode="score", executor="ray", workers=workers,
                          threads_per_worker=1, batch_size=BATCH, quiet=True, unit_rows=unit_rows))
    assert s.exit_code == 0, s.lines()
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000, help="rows of the one Parquet file")
    ap.add_argument("--rounds", type=int, default=2, help="alternating 1-worker / 2-worker rounds (best of each)")
    ap.add_argument("--unit-rows", type=int, default=None, help="rows per work unit (default: the preset's)")
    ap.add_argument("--dir", default=None, help="working directory (default: a temporary one, removed after)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.dir or tempfile.mkdtemp(prefix="grefine-bench-scaling-")
    try:
        import ray

        inp = os.path.join(work, "in", "one.parquet")
        os.makedirs(os.path.dirname(inp), exist_ok=True)
        t = time.perf_counter()
        write_file(inp, args.n)
        print(f"data: one Parquet file, {args.n} JPEG 256x256, row groups of 64 ({time.perf_counter() - t:.1f}s)")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 _temp_dir=tempfile.mkdtemp(prefix="grefine-ray-", dir="/tmp"),
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
        best = {1: 0.0, 2: 0.0}
        for r in range(args.rounds):
            for w in (1, 2):
                out = os.path.join(work, f"out-{w}-{r}")
                s = run(inp, out, w, args.unit_rows)
                man = json.load(open(os.path.join(out, STATE_DIR, "manifest.json")))["run"]
                marker = json.load(open(os.path.join(out, STATE_DIR, "shards", "one.parquet.json")))
                # units working at once: their seconds added up over the busy wall time (2.0 = both workers
                # busy throughout, however slow the shared CPUs made each of them)
                overlap = sum(u["seconds"] for u in marker["units"]) / max(s.wall_s - s.startup_s, 1e-9)
                print(f"round {r + 1}: {man['workers']} worker(s): {s.rows} rows in {s.wall_s - s.startup_s:.1f}s = "
                      f"{s.items_per_s:.1f} img/s ({s.units_run} units of <= {man['unit_rows']} rows, "
                      f"{overlap:.2f} at once; start-up {s.startup_s:.1f}s excluded; "
                      f"load average {os.getloadavg()[0]:.1f})")
                best[w] = max(best[w], s.items_per_s)
                shutil.rmtree(out, ignore_errors=True)
        ray.shutdown()
        print(f"1 worker:  {best[1]:.1f} img/s (best of {args.rounds})")
        print(f"2 workers: {best[2]:.1f} img/s (best of {args.rounds})")
        print(f"ratio: {best[2] / best[1]:.3f}")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
