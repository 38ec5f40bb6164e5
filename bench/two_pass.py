"""Two passes over a data set: audit once (``score``), then ``run --scores AUDIT`` reuses it.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/two_pass.py [--n 1000] [--rounds 3]

1. Data: N JPEG images (256x256, with prompts) in 4 Parquet shards (``job_throughput.write_shards``).
2. ``grefine-curate score IN --out AUDIT`` (tiny preset, local executor), a fresh process: Python
   start, imports, model loading, decoding and the CLIP forward of every image.
3. ``grefine-curate run IN --out OUT --scores AUDIT --refine-worst 0``, a fresh process: the audit
   is checked and read, every route is ``skip``, so no image is decoded and no model is loaded; the
   output shards (input rows + scores) are written.
Both are timed end to end as a user sees them (wall clock of the command); the job's own wall
time (``run.wall_s`` in the manifest, start-up included) is printed too. Rounds alternate the two
commands (fresh folders each round) and the medians are compared (the machine may be shared).

Last line: ``ratio: <time of run --scores AUDIT --refine-worst 0> / <time of the score run>``
(goal <= 0.2: reusing an audit with nothing to refine must not pay the CLIP forward again).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from job_throughput import BATCH, write_shards  # noqa: E402


def cli(args: list[str]) -> float:
    """Run ``grefine-curate ARGS`` in a fresh process; its wall time in seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.path.join(ROOT, "src")}
    code = "import sys; from grefine_curate.cli import main; sys.argv = ['grefine-curate', *sys.argv[1:]]; main()"
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"grefine-curate {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return dt


def job_wall(out: str) -> float:
    with open(os.path.join(out, "__grefine__", "manifest.json")) as f:
        return float(json.load(f)["run"]["wall_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="images")
    ap.add_argument("--rounds", type=int, default=3, help="alternating score / reuse rounds (medians compared)")
    ap.add_argument("--dir", default=None, help="working directory (default: a temporary one, removed after)")
    args = ap.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="grefine-bench-two-pass-")
    common = ["--preset", "tiny", "--executor", "local", "--quiet", "--batch-size", str(BATCH)]
    try:
        inp = os.path.join(work, "in")
        t = time.perf_counter()
        paths = write_shards(inp, args.n)
        print(f"data: {args.n} JPEG 256x256 in {len(paths)} shards ({time.perf_counter() - t:.1f}s to build)")
        score_s, reuse_s = [], []
        for r in range(args.rounds):
            audit, out = os.path.join(work, f"audit{r}"), os.path.join(work, f"out{r}")
            score_s.append(cli(["score", inp, "--out", audit, *common]))
            reuse_s.append(cli(["run", inp, "--out", out, "--scores", audit, "--refine-worst", "0", *common]))
            print(f"round {r + 1}: score {score_s[-1]:.2f}s (job {job_wall(audit):.2f}s), "
                  f"run --scores --refine-worst 0 {reuse_s[-1]:.2f}s (job {job_wall(out):.2f}s)")
            with open(os.path.join(out, "__grefine__", "manifest.json")) as f:
                counts = json.load(f)["counts"]
            assert counts["rows"] == args.n and counts["routes"] == {"skip": args.n}, counts
            shutil.rmtree(audit, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
        s, u = statistics.median(score_s), statistics.median(reuse_s)
        print(f"score run (median of {args.rounds}):               {s:.2f}s = {args.n / s:.1f} img/s end to end")
        print(f"run --scores AUDIT --refine-worst 0 (median):  {u:.2f}s")
        print(f"ratio: {u / s:.3f}")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
