"""The benchmark scripts run (on the CPU, tiny sizes) and print what their READMEs promise."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: int) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_gpu_bench_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    stdout = _run(["bench/gpu.py", "--smoke", "--out", str(out)], timeout=180)
    result = json.loads(out.read_text())
    assert result["smoke"] is True
    s, r = result["score"], result["refine"]
    for key in ("bare_images_per_s", "maps_images_per_s", "score_images_per_s"):
        assert s[key] > 0
    assert r["bare_s_per_image"] > 0 and r["grefine_s_per_image"] > 0 and r["grefine_guard_s_per_image"] > 0
    # the refiner and the bare calls ran exactly the planned denoising steps
    assert r["steps_run_grefine"] == r["steps_planned"] == r["steps_run_bare"]
    assert json.loads(stdout[stdout.index("{"):]) == result  # the JSON is also the end of stdout


def test_decode_bench_prints_ratio_and_score_difference():
    stdout = _run(["bench/decode.py", "--rounds", "2", "--repeat", "1"], timeout=120)
    lines = stdout.strip().splitlines()
    assert re.fullmatch(r"ratio: \d+\.\d\d", lines[-1]), lines[-1]
    diff = next(line for line in lines if line.startswith("max abs score difference:"))
    assert float(diff.split(":")[1].split()[0]) < 0.01  # fast decode moves scores by < 0.01 (tiny preset)
    assert "(256, 256)" in stdout  # 1024x1024 JPEGs decode DCT-scaled to 256x256


def test_tar_memory_bench_streams_and_prints_ratio():
    stdout = _run(["bench/tar_memory.py", "--small-mb", "2", "--big-mb", "8", "--member-kb", "64"], timeout=120)
    small = re.search(r"small: \d+ MB tar, (\d+) samples", stdout)
    big = re.search(r"big: \d+ MB tar, (\d+) samples", stdout)
    assert small and big and int(big.group(1)) == 4 * int(small.group(1))
    assert re.search(r"^ratio: \d+\.\d{3}$", stdout.strip().splitlines()[-1])


def test_two_pass_bench_prints_ratio():
    stdout = _run(["bench/two_pass.py", "--n", "24", "--rounds", "1"], timeout=300)
    lines = stdout.strip().splitlines()
    assert re.fullmatch(r"ratio: \d+\.\d{3}", lines[-1]), lines[-1]
