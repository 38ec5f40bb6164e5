"""Work units below the file: planning by whole row groups, parts committed on their own, the
concatenation into the mirrored output, resume after kill -9 at a unit boundary, and the output
file as its own commit record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from grefine_curate.pipelines import columns as C
from grefine_curate.pipelines import units as U
from grefine_curate.pipelines.job import JobConfig, run_job
from grefine_curate.pipelines.records import read_record
from grefine_curate.pipelines.sources import TMP_MARK, Shard, discover
from job_corpus import jpeg, write_folder, write_shard

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(inp, out, **kw) -> JobConfig:
    kw.setdefault("mode", "score")
    kw.setdefault("batch_size", 4)
    return JobConfig(inputs=[str(inp)], out=str(out), preset="tiny", executor="local", quiet=True, **kw)


def _big_shard(path, n=40, group=5, struct=False):
    """One Parquet file of n rows in row groups of `group` rows (HF struct image column optional)."""
    write_shard(str(path), n, struct=struct)
    t = pq.read_table(path)
    pq.write_table(t, path, row_group_size=group)


def _files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_units_are_whole_row_groups_and_respect_the_row_cap():
    shard = Shard(format="parquet", fs=None, path="x", rel="x", num_rows=23, source_key="k",
                  row_groups=(5, 5, 5, 5, 3))
    units = U.plan_units(shard, None, 8)
    assert [(u.start, u.stop, u.row_groups) for u in units] == [(0, 10, (0, 1)), (10, 20, (2, 3)), (20, 23, (4,))]
    assert [(u.start, u.stop) for u in U.plan_units(shard, 12, 5)] == [(0, 5), (5, 10), (10, 12)]
    assert [(u.start, u.stop) for u in U.plan_units(shard, None, 1000)] == [(0, 23)]
    one_group = Shard(format="parquet", fs=None, path="x", rel="x", num_rows=20000, source_key="k", row_groups=(20000,))
    assert len(U.plan_units(one_group, None, 256)) == 1  # a unit never splits a row group
    folder = Shard(format="imagefolder", fs=None, path="d", rel="scores/d-00000.parquet", num_rows=5, source_key="k")
    assert [(u.start, u.stop) for u in U.plan_units(folder, None, 2)] == [(0, 2), (2, 4), (4, 5)]


def test_a_file_in_units_gives_the_same_output_as_one_unit(tmp_path):
    _big_shard(tmp_path / "in" / "big.parquet", n=10, group=5, struct=True)
    # unit boundaries on batch boundaries: batched diffusion may differ in the last bits across batchings
    whole = run_job(_cfg(tmp_path / "in", tmp_path / "whole", mode="refine", unit_rows=1000, batch_size=5))
    split = run_job(_cfg(tmp_path / "in", tmp_path / "split", mode="refine", unit_rows=5, batch_size=5))
    assert whole.exit_code == 0 and split.exit_code == 0, split.lines()
    assert (whole.units_run, split.units_run, split.shards_run) == (1, 2, 1)
    a, b = pq.read_table(tmp_path / "whole" / "big.parquet"), pq.read_table(tmp_path / "split" / "big.parquet")
    assert b.schema == a.schema and b.schema.metadata == a.schema.metadata  # HF features kept
    assert b.to_pylist() == a.to_pylist()  # every row once, in input order, every column (same seeds and pixels)
    src = pq.read_table(tmp_path / "in" / "big.parquet")
    assert b.column("row_key").to_pylist() == src.column("row_key").to_pylist()
    marker = json.loads((tmp_path / "split" / "__grefine__" / "shards" / "big.parquet.json").read_text())
    assert [(u["start"], u["stop"]) for u in marker["units"]] == [(0, 5), (5, 10)]
    assert marker["rows"] == 10 and sum(marker["status"].values()) == 10 and sum(marker["routes"].values()) == 10
    assert {r for r in b.column(C.ROUTE).to_pylist()} & {"light", "full"}, "no row was refined: nothing checked"
    rec, rows = read_record(pafs.LocalFileSystem(), str(tmp_path / "split" / "big.parquet"))
    assert rows == 10 and rec["fingerprint"] == split.config_hash and len(rec["units"]) == 2
    # the parts are gone once the output is complete; nothing temporary is left
    assert not [f for f in _files(tmp_path / "split") if "/units/" in f or TMP_MARK in f]


def test_folder_units_keep_order_and_mirror_images(tmp_path):
    rels = write_folder(str(tmp_path / "imgs"), n=5)
    s = run_job(_cfg(tmp_path / "imgs", tmp_path / "out", mode="refine", unit_rows=2))
    assert s.exit_code == 0 and s.units_run == 3 and s.rows == 5, s.lines()
    scores = pq.read_table(tmp_path / "out" / "scores" / "imgs-00000.parquet")
    assert scores.column(C.SOURCE).to_pylist() == sorted(rels)
    assert _files(tmp_path / "out" / "images") == sorted(rels)


def test_all_units_committed_but_not_assembled_is_assembled_without_recomputing(tmp_path, monkeypatch):
    _big_shard(tmp_path / "in" / "big.parquet", n=20, group=5)

    def killed(self, book):
        raise KeyboardInterrupt  # the driver dies after the last part's commit, before the concatenation

    monkeypatch.setattr(U.UnitLedger, "_assemble", killed)
    first = run_job(_cfg(tmp_path / "in", tmp_path / "out", unit_rows=5))
    assert first.state == "interrupted" and not (tmp_path / "out" / "big.parquet").exists()
    parts = [f for f in _files(tmp_path / "out") if "/units/" in f]
    assert len(parts) == 4
    monkeypatch.undo()
    second = run_job(_cfg(tmp_path / "in", tmp_path / "out", unit_rows=5))
    assert second.exit_code == 0 and second.units_run == 0 and second.shards_run == 1, second.lines()
    out = pq.read_table(tmp_path / "out" / "big.parquet")
    assert out.column(C.ID).to_pylist() == [f"big.parquet#{i}" for i in range(20)]


def test_parts_of_another_config_are_not_reused(tmp_path, monkeypatch):
    _big_shard(tmp_path / "in" / "big.parquet", n=10, group=5)
    monkeypatch.setattr(U.UnitLedger, "_assemble", lambda self, book: (_ for _ in ()).throw(KeyboardInterrupt))
    run_job(_cfg(tmp_path / "in", tmp_path / "out", unit_rows=5))
    monkeypatch.undo()
    forced = run_job(_cfg(tmp_path / "in", tmp_path / "out", unit_rows=5, force=True,
                          overrides={"aq": {"beta": 0.3}}))
    assert forced.exit_code == 0 and forced.units_run == 2  # the old parts' records name another fingerprint


JOB_SCRIPT = """
import sys
from grefine_curate.pipelines.faults import Delay
from grefine_curate.pipelines.job import JobConfig, run_job
s = run_job(JobConfig(batch_hook=Delay(float(sys.argv[3])), inputs=[sys.argv[1]], out=sys.argv[2], preset="tiny", executor="local", mode="score",
                      batch_size=5, quiet=True, unit_rows=10))
sys.exit(s.exit_code)
"""


def test_kill_9_mid_file_keeps_finished_units(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    _big_shard(inp / "big.parquet", n=40, group=5)
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.path.join(ROOT, "src")}
    proc = subprocess.Popen([sys.executable, "-c", JOB_SCRIPT, str(inp), str(out), "0.3"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    parts_dir = out / "__grefine__" / "units" / "big.parquet"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        parts = [p for p in parts_dir.iterdir() if TMP_MARK not in p.name] if parts_dir.exists() else []
        if len(parts) >= 2:
            break
        if proc.poll() is not None:
            pytest.fail(f"job exited early ({proc.returncode}): {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("no unit finished in time")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    committed = {p.name: p.stat().st_mtime_ns for p in parts_dir.iterdir() if TMP_MARK not in p.name}
    assert 2 <= len(committed) < 4 and not (out / "big.parquet").exists()
    s = run_job(_cfg(inp, out, unit_rows=10, batch_size=5))
    assert s.exit_code == 0, s.lines()
    assert s.units_total == 4 and s.units_run == 4 - len(committed)  # a finished unit is never recomputed
    got = pq.read_table(out / "big.parquet")
    assert got.column(C.ID).to_pylist() == [f"big.parquet#{i}" for i in range(40)]  # exactly once, in order
    assert not [f for f in _files(out) if TMP_MARK in f or "/units/" in f]


def test_unit_rows_is_not_part_of_the_config_fingerprint(tmp_path):
    pq.write_table(pa.table({"image": [jpeg(i) for i in range(6)], "prompt": ["a cat"] * 6}),
                   tmp_path / "s.parquet", row_group_size=2)
    a = run_job(_cfg(tmp_path / "s.parquet", tmp_path / "out", unit_rows=2, limit=4))
    b = run_job(_cfg(tmp_path / "s.parquet", tmp_path / "out", unit_rows=4))  # no ConfigError, resumes
    assert a.config_hash == b.config_hash and b.exit_code == 0 and b.rows == 6
    assert discover([str(tmp_path / "s.parquet")])[0].row_groups == (2, 2, 2)


def test_units_of_all_files_are_scheduled_largest_first(tmp_path, monkeypatch):
    from grefine_curate.pipelines import job as job_module
    from grefine_curate.pipelines.executors import ExecReport

    _big_shard(tmp_path / "in" / "a-small.parquet", n=6, group=3)
    _big_shard(tmp_path / "in" / "b-big.parquet", n=20, group=5)
    seen = []

    class Capture:  # an injected executor: sees the tasks, runs nothing
        def run(self, tasks, spec, opts, progress, finish=None):
            seen.extend((t.shard.rel, t.start, t.rows) for t in tasks)
            return ExecReport()

    run_job(_cfg(tmp_path / "in", tmp_path / "out", unit_rows=10, executor_impl=Capture()))
    assert seen == [("b-big.parquet", 0, 10), ("b-big.parquet", 10, 10), ("a-small.parquet", 0, 6)]


@pytest.mark.parametrize("bad", [{"unit_rows": 0}, {"threads_per_worker": 0}])
def test_unit_options_are_checked_before_any_work(tmp_path, bad):
    from grefine_curate.curate.errors import ConfigError
    from grefine_curate.pipelines.job import exit_code_for

    _big_shard(tmp_path / "in" / "a.parquet", n=4, group=2)
    with pytest.raises(ConfigError) as e:
        run_job(_cfg(tmp_path / "in", tmp_path / "out", **bad))
    assert exit_code_for(e.value) == 2 and list(bad)[0].replace("_", " ") in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_file_that_cannot_be_assembled_fails_alone_and_keeps_its_parts(tmp_path, monkeypatch):
    _big_shard(tmp_path / "in" / "a.parquet", n=8, group=4)
    _big_shard(tmp_path / "in" / "b.parquet", n=8, group=4)
    real = U.UnitLedger._assemble

    def flaky(self, book):
        if book.shard.rel == "a.parquet":
            raise OSError("the store refused the write")
        return real(self, book)

    monkeypatch.setattr(U.UnitLedger, "_assemble", flaky)
    s = run_job(_cfg(tmp_path / "in", tmp_path / "out", unit_rows=4))
    assert s.exit_code == 1 and s.shards_run == 1, s.lines()
    assert s.shards_failed == [("a.parquet", "assembling the output from its units failed: OSError: the store "
                                             "refused the write")]
    assert (tmp_path / "out" / "b.parquet").exists() and not (tmp_path / "out" / "a.parquet").exists()
    monkeypatch.undo()
    again = run_job(_cfg(tmp_path / "in", tmp_path / "out", unit_rows=4))
    assert again.exit_code == 0 and again.units_run == 0 and again.shards_run == 1  # assembled from its parts


def test_scores_from_an_audit_line_up_with_units_past_the_first(tmp_path):
    """--scores takes the audit's rows in step with the input: a unit starting at row k takes rows k..."""
    _big_shard(tmp_path / "in" / "big.parquet", n=12, group=4)
    audit = run_job(_cfg(tmp_path / "in", tmp_path / "audit", unit_rows=4))
    assert audit.exit_code == 0 and audit.units_run == 3
    s = run_job(_cfg(tmp_path / "in", tmp_path / "out", mode="refine", unit_rows=4, scores=str(tmp_path / "audit")))
    assert s.exit_code == 0 and s.units_run == 3, s.lines()  # an audit row out of step is an InputError
    a = pq.read_table(tmp_path / "audit" / "big.parquet")
    b = pq.read_table(tmp_path / "out" / "big.parquet")
    assert b.column(C.PQ_SCORE).to_pylist() == a.column(C.PQ_SCORE).to_pylist()  # each row got its own scores
