"""The job end to end on object storage: input and output on ``s3://`` against a local S3-compatible
server (moto in server mode, 127.0.0.1, started here), reached the way a user reaches MinIO or R2:
``AWS_ENDPOINT_URL`` + credentials in the environment, plain ``s3://`` URIs. Parquet and WebDataset
inputs; kill -9 mid-file and a rerun give every row exactly once without redoing finished units."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from grefine_curate.pipelines import columns as C
from grefine_curate.pipelines.job import JobConfig, run_job
from grefine_curate.pipelines.sources import TMP_MARK
from job_corpus import write_shard
from test_webdataset import good_members, write_tar

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def s3_env(s3_server):
    return s3_server


@pytest.fixture
def bucket(s3_env, request):
    """A fresh bucket per test (bucket names: lowercase, 3-63 chars)."""
    env, fs = s3_env
    name = "t-" + request.node.name.lower().replace("_", "-")[:40].rstrip("-")
    fs.create_dir(name)
    yield name, fs, env
    fs.delete_dir(name)


def _upload(fs, local: str, dest: str) -> None:
    with open(local, "rb") as f, fs.open_output_stream(dest) as out:
        out.write(f.read())


def _keys(fs, root) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File)


def _read_parquet(fs, path):
    with fs.open_input_file(path) as f:
        return pq.read_table(f)


def _cfg(inp: str, out: str, **kw) -> JobConfig:
    kw.setdefault("mode", "score")
    return JobConfig(inputs=[inp], out=out, preset="tiny", executor="local", batch_size=4, quiet=True, **kw)


def test_parquet_and_webdataset_from_s3_to_s3(bucket, tmp_path):
    name, fs, _ = bucket
    write_shard(str(tmp_path / "a.parquet"), 12)
    pq.write_table(pq.read_table(tmp_path / "a.parquet"), tmp_path / "a.parquet", row_group_size=4)
    write_shard(str(tmp_path / "b.parquet"), 3, start=12)
    _upload(fs, str(tmp_path / "a.parquet"), f"{name}/in/pq/a.parquet")
    _upload(fs, str(tmp_path / "b.parquet"), f"{name}/in/pq/sub/b.parquet")
    s = run_job(_cfg(f"s3://{name}/in/pq", f"s3://{name}/out/pq", mode="refine", unit_rows=4))
    assert s.exit_code == 0 and s.rows == 15 and s.units_run == 4, s.lines()
    keys = _keys(fs, f"{name}/out/pq")
    assert "a.parquet" in keys and "sub/b.parquet" in keys and "__grefine__/manifest.json" in keys
    assert not [k for k in keys if TMP_MARK in k or "/units/" in k]
    a = _read_parquet(fs, f"{name}/out/pq/a.parquet")
    assert a.column("row_key").to_pylist() == list(range(12))  # every row once, in input order
    assert a.column(C.STATUS).to_pylist() == ["ok"] * 12
    # WebDataset: a tar on S3 in, the tar and its sidecar on S3 out
    write_tar(str(tmp_path / "wds" / "00000.tar"), good_members(4))
    _upload(fs, str(tmp_path / "wds" / "00000.tar"), f"{name}/in/wds/00000.tar")
    w = run_job(_cfg(f"s3://{name}/in/wds", f"s3://{name}/out/wds", mode="refine", unit_rows=2))
    assert w.exit_code == 0 and w.rows == 4 and w.units_run == 2, w.lines()  # units start mid-tar on S3
    side = _read_parquet(fs, f"{name}/out/wds/00000.parquet")
    assert side.column(C.KEY).to_pylist() == [f"{i:09d}" for i in range(4)]
    with fs.open_input_stream(f"{name}/out/wds/00000.tar") as f:
        names = [m.name for m in tarfile.open(fileobj=io.BytesIO(f.read())).getmembers()]
    assert names[:2] == ["000000000.jpg", "000000000.txt"] and "000000000.json" in names
    # rerun: everything complete, nothing recomputed
    again = run_job(_cfg(f"s3://{name}/in/wds", f"s3://{name}/out/wds", mode="refine", unit_rows=2))
    assert again.shards_skipped == 1 and again.units_run == 0


JOB_SCRIPT = """
import sys
from grefine_curate.pipelines.faults import Delay
from grefine_curate.pipelines.job import JobConfig, run_job
s = run_job(JobConfig(batch_hook=Delay(float(sys.argv[3])), inputs=[sys.argv[1]], out=sys.argv[2], preset="tiny", executor="local", mode="score",
                      batch_size=4, quiet=True, unit_rows=8))
sys.exit(s.exit_code)
"""


def test_kill_9_and_resume_on_s3_gives_every_row_once(bucket, tmp_path):
    name, fs, env = bucket
    write_shard(str(tmp_path / "big.parquet"), 40)
    pq.write_table(pq.read_table(tmp_path / "big.parquet"), tmp_path / "big.parquet", row_group_size=4)
    _upload(fs, str(tmp_path / "big.parquet"), f"{name}/in/big.parquet")
    write_tar(str(tmp_path / "00000.tar"), good_members(6))
    _upload(fs, str(tmp_path / "00000.tar"), f"{name}/in/00000.tar")
    inp, out = f"s3://{name}/in", f"s3://{name}/out"
    penv = {**os.environ, **env, "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.path.join(ROOT, "src")}
    proc = subprocess.Popen([sys.executable, "-c", JOB_SCRIPT, inp, out, "0.3"], env=penv, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    parts = f"{name}/out/__grefine__/units/big.parquet"
    t0 = time.monotonic()
    committed: list[str] = []
    while time.monotonic() - t0 < 180:
        committed = [k for k in _keys(fs, parts) if TMP_MARK not in k]
        if len(committed) >= 2:
            break
        if proc.poll() is not None:
            pytest.fail(f"job exited early ({proc.returncode}): {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("no unit finished in time")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    committed = [k for k in _keys(fs, parts) if TMP_MARK not in k]
    assert 2 <= len(committed) < 5
    s = run_job(_cfg(inp, out, unit_rows=8))
    assert s.exit_code == 0 and s.rows == 46, s.lines()
    tar_done_before = s.shards_skipped  # the tar (one unit) may have finished before the kill
    assert s.units_run == (5 - len(committed)) + (1 - tar_done_before)  # finished units are not redone
    big = _read_parquet(fs, f"{name}/out/big.parquet")
    assert big.column(C.ID).to_pylist() == [f"big.parquet#{i}" for i in range(40)]
    side = _read_parquet(fs, f"{name}/out/00000.parquet")
    assert side.column(C.KEY).to_pylist() == [f"{i:09d}" for i in range(6)]
    assert not [k for k in _keys(fs, f"{name}/out") if TMP_MARK in k or "/units/" in k]



@pytest.mark.ray
def test_ray_actors_read_and_write_s3(bucket, tmp_path, ray_session):
    """The actors get the job's filesystem and write their units' parts to S3. Credentials given in the URI
    travel with it (the session's Ray workers started before this module's environment, like cluster
    workers without credentials of their own); the manifest records the URIs with them masked."""
    name, fs, _ = bucket
    write_shard(str(tmp_path / "a.parquet"), 8)
    pq.write_table(pq.read_table(tmp_path / "a.parquet"), tmp_path / "a.parquet", row_group_size=4)
    _upload(fs, str(tmp_path / "a.parquet"), f"{name}/in/a.parquet")
    s = run_job(JobConfig(inputs=[f"s3://testing:testing@{name}/in"], out=f"s3://testing:testing@{name}/out",
                          preset="tiny", mode="score",
                          executor="ray", workers=2, batch_size=4, quiet=True, unit_rows=4))
    assert s.exit_code == 0 and s.units_run == 2 and s.rows == 8, s.lines()
    a = _read_parquet(fs, f"{name}/out/a.parquet")
    assert a.column("row_key").to_pylist() == list(range(8))
    assert not [k for k in _keys(fs, f"{name}/out") if TMP_MARK in k or "/units/" in k]
    with fs.open_input_stream(f"{name}/out/__grefine__/manifest.json") as f:
        manifest = f.read().decode()
    assert "testing:testing" not in manifest and f"s3://***@{name}/in" in manifest
