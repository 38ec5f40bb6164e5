"""Nothing lost, nothing leaked (issue 15): a lock on OUT, local paths named by the data, symlinks,
input columns named like ours, names that readers skip. Each test failed before its fix.

Jobs run in-process with an injected fake engine; a concurrent job runs in a forked child.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grefine_curate.curate.errors import InputError
from grefine_curate.pipelines import columns as C
from grefine_curate.pipelines.faults import Delay
from grefine_curate.pipelines.job import JobConfig, run_job
from job_corpus import FakeEngine, encode, rgb, write_dataset, write_shard


def _fake(spec):
    return FakeEngine()


def _cfg(inp, out, **kw) -> JobConfig:
    kw.setdefault("mode", "score")
    return JobConfig(inputs=[str(inp)], out=str(out), preset="tiny", executor="local", batch_size=2, quiet=True,
                     engine_factory=_fake, write_report=False, max_error_rate=1.0, **kw)


def _rows(path) -> dict:
    return pq.read_table(path).to_pydict()


# ---------------------------------------------------------------------------------------------
# 2. A lock on OUT


def test_a_second_job_on_the_same_out_is_refused_at_once_naming_the_holder(tmp_path):
    write_dataset(str(tmp_path / "in"), shards=3, rows=4)
    first = multiprocessing.get_context("fork").Process(
        target=run_job, args=(_cfg(tmp_path / "in", tmp_path / "out", batch_hook=Delay(0.4)),))
    first.start()
    lock = tmp_path / "out" / "__grefine__" / "lock.json"
    t0 = time.monotonic()
    while not lock.exists() and time.monotonic() - t0 < 60:
        time.sleep(0.05)
    holder = json.loads(lock.read_text())
    with pytest.raises(InputError) as e:  # another config, while no shard is complete: refused all the same
        run_job(_cfg(tmp_path / "in", tmp_path / "out", save_maps=True))
    assert f"pid {holder['pid']}" in str(e.value) and "--wait-lock" in str(e.value)
    first.join(120)
    assert first.exitcode is not None  # the first job was never disturbed: its outputs are complete
    man = json.loads((tmp_path / "out" / "__grefine__" / "manifest.json").read_text())
    assert man["state"] == "done" and man["counts"]["rows"] == 12 and not lock.exists()
    waited = run_job(_cfg(tmp_path / "in", tmp_path / "out", wait_lock=30))
    assert waited.exit_code == 0 and waited.shards_skipped == 3


def test_a_lock_left_by_a_killed_job_is_taken_over(tmp_path):
    write_dataset(str(tmp_path / "in"), shards=1, rows=2)
    gone = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    gone.start()
    gone.join()
    import socket

    (tmp_path / "out" / "__grefine__").mkdir(parents=True)
    (tmp_path / "out" / "__grefine__" / "lock.json").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": gone.pid, "started": time.time(), "token": "x", "what": "score"}))
    s = run_job(_cfg(tmp_path / "in", tmp_path / "out"))
    assert s.exit_code == 0 and s.rows == 2


# ---------------------------------------------------------------------------------------------
# 3. Local paths in data are a policy


def _struct_shard(path, cells):
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array(cells, struct), "prompt": ["a red car"] * len(cells)}), path)


def test_paths_in_data_are_read_only_inside_the_input_folder_unless_allowed(tmp_path):
    (tmp_path / "data" / "img").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (tmp_path / "data" / "img" / "ok.png").write_bytes(encode(rgb(1)))
    (tmp_path / "secret" / "private.png").write_bytes(encode(rgb(2)))
    (tmp_path / "secret" / "creds.txt").write_text("AWS_SECRET_ACCESS_KEY=abcd1234\n")
    (tmp_path / "data" / "notes.txt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    cells = [{"bytes": None, "path": p} for p in
             ("img/ok.png", "../secret/private.png", str(tmp_path / "secret" / "creds.txt"), "/etc/passwd",
              "notes.txt", "nosuchscheme://bucket/x.png")]
    _struct_shard(tmp_path / "data" / "s.parquet", cells)
    s = run_job(_cfg(tmp_path / "data" / "s.parquet", tmp_path / "out"))
    out = _rows(tmp_path / "out" / "s.parquet")
    assert out[C.STATUS] == ["ok", "error", "error", "error", "error", "error"]  # a bad URI is a row, not a dead unit
    assert "nosuchscheme://bucket/x.png" in out[C.ERROR][5]
    assert "../secret/private.png" in out[C.ERROR][1] and "--allow-paths" in out[C.ERROR][1]
    assert "/etc/passwd" in out[C.ERROR][3]
    text = json.dumps(out[C.ERROR])
    assert "root:x" not in text and "AWS_SECR" not in text and "72 6f 6f 74" not in text  # no bytes of any file
    allowed = run_job(_cfg(tmp_path / "data" / "s.parquet", tmp_path / "out2", allow_paths=[str(tmp_path / "secret")]))
    assert _rows(tmp_path / "out2" / "s.parquet")[C.STATUS][:2] == ["ok", "ok"]
    assert s.rows == allowed.rows == 6


# ---------------------------------------------------------------------------------------------
# 5. Symlinks


def test_links_that_loop_or_leave_the_input_are_not_followed_and_a_linked_file_is_read_once(tmp_path, caplog):
    d = tmp_path / "photos"
    d.mkdir()
    (tmp_path / "outside").mkdir()
    (d / "a.png").write_bytes(encode(rgb(1)))
    (tmp_path / "outside" / "o.png").write_bytes(encode(rgb(2)))
    os.symlink("..", d / "up")  # a loop through the parent, and out of the input
    os.symlink(".", d / "self")  # a loop
    os.symlink(str(tmp_path / "outside"), d / "ext")  # a folder outside the input
    os.symlink("a.png", d / "z-alias.png")  # the same file again
    with caplog.at_level(logging.WARNING):
        s = run_job(_cfg(d, tmp_path / "out"))
    assert s.rows == 1, s.lines()
    assert _rows(tmp_path / "out" / "scores" / "photos-00000.parquet")[C.ID] == ["a.png"]
    assert "not followed" in caplog.text


# ---------------------------------------------------------------------------------------------
# 7. Input columns named like ours


def test_input_columns_named_like_ours_are_refused_unless_the_input_is_our_output(tmp_path):
    write_shard(str(tmp_path / "in" / "a.parquet"), 3)
    t = pq.read_table(tmp_path / "in" / "a.parquet")
    bad = t.append_column(C.PQ_SCORE, pa.array([9.0, 9.0, 9.0])).append_column(C.PQ_MAP, pa.array([b"junk"] * 3))
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(InputError) as e:
        run_job(_cfg(tmp_path / "bad.parquet", tmp_path / "x"))
    assert "pq_score" in str(e.value) and "pq_map" in str(e.value)
    assert run_job(_cfg(tmp_path / "in", tmp_path / "o1", mode="refine")).exit_code == 0
    chained = run_job(_cfg(tmp_path / "o1" / "a.parquet", tmp_path / "o2", mode="refine"))  # our own output: fine
    assert chained.exit_code == 0 and chained.rows == 3


# ---------------------------------------------------------------------------------------------
# 9. Names that readers skip


def test_inputs_whose_outputs_readers_would_skip_are_said_before_work(tmp_path, caplog):
    write_shard(str(tmp_path / "in" / "_a.parquet"), 2)
    write_shard(str(tmp_path / "in" / "b.parquet"), 2)
    write_shard(str(tmp_path / "in" / ".hidden" / "c.parquet"), 2)
    with caplog.at_level(logging.WARNING):
        s = run_job(_cfg(tmp_path / "in", tmp_path / "out"))
    assert s.rows == 4
    assert "_a.parquet" in caplog.text and "skip" in caplog.text  # the output pandas would not read
    assert ".hidden" in caplog.text and "not read" in caplog.text  # the hidden input, said
