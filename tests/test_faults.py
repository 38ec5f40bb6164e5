"""Faults: a bad-input corpus becomes error rows (the job goes on); kill -9 and Ctrl-C, then rerun:
every row exactly once, finished shards not recomputed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from grefine_curate.pipelines import columns as C
from grefine_curate.pipelines.job import JobConfig, run_job
from grefine_curate.pipelines.sources import TMP_MARK
from job_corpus import write_bad_shard, write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

JOB_SCRIPT = """
import sys
from grefine_curate.pipelines.faults import Delay
from grefine_curate.pipelines.job import JobConfig, run_job
s = run_job(JobConfig(batch_hook=Delay(float(sys.argv[3])), inputs=[sys.argv[1]], out=sys.argv[2], preset="tiny", executor="local", mode="score",
                      batch_size=2, quiet=True))
sys.exit(s.exit_code)
"""


def _cfg(inp, out, **kw) -> JobConfig:
    return JobConfig(inputs=[str(inp)], out=str(out), preset="tiny", executor="local", mode="score", batch_size=2,
                     quiet=True, **kw)


def _temporaries(root) -> list[str]:
    return [f for _, _, fs in os.walk(root) for f in fs if TMP_MARK in f]


def _start_job(inp, out) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.path.join(ROOT, "src")}
    return subprocess.Popen([sys.executable, "-c", JOB_SCRIPT, str(inp), str(out), "0.4"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for_first_marker(proc, out, timeout=120.0) -> str:
    markers = out / "__grefine__" / "shards" / "part-a"
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if markers.exists() and any(markers.iterdir()):
            return str(next(markers.iterdir()))
        if proc.poll() is not None:
            pytest.fail(f"job exited early ({proc.returncode}): {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no shard finished in time")


def _assert_exactly_once(inp, out, shards):
    for rel in shards:
        src = pq.read_table(inp / rel)
        got = pq.read_table(out / rel).column(C.ID).to_pylist()
        assert got == [f"{rel}#{i}" for i in range(src.num_rows)], rel  # every row once, in order
    assert not _temporaries(out)


def test_bad_input_corpus_becomes_error_rows(tmp_path):
    corpus = write_bad_shard(str(tmp_path / "in" / "bad.parquet"))
    s = run_job(_cfg(tmp_path / "in", tmp_path / "out", max_error_rate=0.5, id_column="id"))
    assert s.exit_code == 0, s.lines()
    out = pq.read_table(tmp_path / "out" / "bad.parquet").to_pylist()
    assert len(out) == len(corpus)
    for (name, _, prompt, expected), row in zip(corpus, out):
        assert row[C.STATUS] == expected, (name, row[C.ERROR])
        if expected == "error":
            assert row[C.ERROR].startswith(f"{name}: ") and row[C.PQ_SCORE] is None  # names the item
        else:
            assert row[C.ERROR] is None and 0.0 <= row[C.PQ_SCORE] <= 1.0
            has_prompt = prompt is not None and prompt.strip() != ""
            assert (row[C.AQ_SCORE] is not None) == has_prompt, name  # no prompt: PQ only
    errors = {name: row[C.ERROR] for (name, *_), row in zip(corpus, out) if row[C.STATUS] == "error"}
    assert "zero bytes" in errors["zero-length"] and "null" in errors["null"]
    assert "above the limit" in errors["over-pixel-limit"]
    assert [r[C.ID] for r in out] == [c[0] for c in corpus]  # duplicate ids kept, input order kept
    n_err = sum(c[3] == "error" for c in corpus)
    assert s.status == {"ok": len(corpus) - n_err, "error": n_err} and n_err == 6


def test_refine_routes_promptless_items_by_pq_alone(tmp_path):
    corpus = write_bad_shard(str(tmp_path / "in" / "bad.parquet"))
    keep = {"good-jpeg", "null", "null-prompt", "empty-prompt"}
    import pyarrow as pa

    t = pq.read_table(tmp_path / "in" / "bad.parquet")
    t = t.filter(pa.array([c[0] in keep for c in corpus]))
    pq.write_table(t, tmp_path / "in" / "bad.parquet")
    s = run_job(JobConfig(inputs=[str(tmp_path / "in")], out=str(tmp_path / "out"), preset="tiny",
                          executor="local", quiet=True, max_error_rate=0.5))
    assert s.exit_code == 0, s.lines()
    rows = pq.read_table(tmp_path / "out" / "bad.parquet").to_pylist()
    assert [r["id"] for r in rows] == ["good-jpeg", "null", "null-prompt", "empty-prompt"]  # input order
    for r in rows:
        if r["id"] == "null":
            assert r[C.STATUS] == "error" and r[C.ROUTE] is None and r["image"] is None
        else:
            assert r[C.STATUS] == "ok" and r[C.ROUTE] in C.ROUTES
        if r["id"] in ("null-prompt", "empty-prompt"):
            assert r[C.AQ_SCORE] is None and r[C.AQ_SCORE_AFTER] is None and r[C.UNMATCHED] == []


def test_kill_9_then_rerun_gives_every_row_exactly_once(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_dataset(str(inp), shards=4, rows=4)
    proc = _start_job(inp, out)
    first = _wait_for_first_marker(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done_before = {p: os.stat(p).st_mtime_ns for p in [first, first.replace("/__grefine__/shards", "")[:-5]]}
    summary = run_job(_cfg(inp, out))
    assert summary.exit_code == 0 and summary.shards_skipped >= 1
    assert summary.shards_run + summary.shards_skipped == 4 and summary.rows == 16
    for p, mtime in done_before.items():
        assert os.stat(p).st_mtime_ns == mtime, f"{p} was recomputed"
    shards = ["part-a/shard-000.parquet", "part-a/shard-002.parquet", "part-b/shard-001.parquet",
              "part-b/shard-003.parquet"]
    _assert_exactly_once(inp, out, shards)


def test_ctrl_c_stops_cleanly_and_keeps_finished_shards(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_dataset(str(inp), shards=4, rows=4)
    proc = _start_job(inp, out)
    _wait_for_first_marker(proc, out)
    time.sleep(0.3)  # inside the next shard
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    log = proc.stdout.read().decode()
    assert proc.returncode == 130, log[-2000:]
    assert not _temporaries(out), "a clean stop removes its partial output"
    import json

    man = json.loads((out / "__grefine__" / "manifest.json").read_text())
    assert man["state"] == "interrupted" and man["counts"]["shards_complete"] >= 1
    summary = run_job(_cfg(inp, out))
    assert summary.exit_code == 0 and summary.shards_skipped == man["counts"]["shards_complete"]
    _assert_exactly_once(inp, out, ["part-a/shard-000.parquet", "part-a/shard-002.parquet",
                                    "part-b/shard-001.parquet", "part-b/shard-003.parquet"])


def test_an_output_that_cannot_be_encoded_is_an_error_row_not_a_failed_shard(tmp_path, monkeypatch):
    """Step 4b encodes per item: an encoder failure (e.g. WebP's size limit) marks that row only."""
    from grefine_curate.pipelines import processor

    real = processor.encode_image
    calls = {"n": 0}

    def flaky(img, fmt="PNG", quality=95):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("encoder refused the image")
        return real(img, fmt, quality)

    monkeypatch.setattr(processor, "encode_image", flaky)
    write_dataset(str(tmp_path / "in"), shards=1, rows=4)
    summary = run_job(JobConfig(inputs=[str(tmp_path / "in")], out=str(tmp_path / "out"), preset="tiny",
                                executor="local", quiet=True, batch_size=4,
                                overrides={"routing": {"skip_a": 1.0, "light_a": 1.0}}))  # every item: full
    assert summary.exit_code in (0, 3)
    rows = pq.read_table(tmp_path / "out" / "part-a" / "shard-000.parquet").to_pylist()
    errors = [r for r in rows if r[C.STATUS] == "error"]
    assert len(rows) == 4 and len(errors) == 1 and "encoding the output" in errors[0][C.ERROR]
    src = pq.read_table(tmp_path / "in" / "part-a" / "shard-000.parquet").to_pylist()
    assert errors[0]["image"] == src[rows.index(errors[0])]["image"]  # the original bytes kept
