"""A real multi-node Ray run on this machine: a two-node cluster (``ray.cluster_utils.Cluster``, as
Ray's own tests do: a head and a worker node, each its own raylet and object store), driven by the
command line (``grefine-curate run --address ...``). Both nodes process units (each unit's node id
is in the shard marker); then the worker node is removed mid-job: the job completes, every row
exactly once, and the unit that node was working on is the only work redone.

One cluster serves both tests (start-up costs seconds and memory on a 2-core machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from grefine_curate.pipelines import columns as C
from grefine_curate.pipelines.records import read_record
from grefine_curate.pipelines.sources import TMP_MARK
from job_corpus import write_shard

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(os.path.dirname(sys.executable), "grefine-curate")


@pytest.fixture(scope="module")
def two_nodes():
    import ray._private.utils as ray_utils
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = tempfile.mkdtemp(prefix="grefine-cl-", dir="/tmp")  # Ray's socket paths must stay short
    common = {"num_cpus": 1, "temp_dir": tmp, "node_ip_address": "127.0.0.1"}  # loopback only
    mp = pytest.MonkeyPatch()
    # Cluster() writes /tmp/ray/ray_current_cluster (what `ray.init("auto")` joins): not ours to change
    mp.setattr(ray_utils, "write_ray_address", lambda *a, **k: None)
    try:
        cluster = Cluster(initialize_head=True, head_node_args={**common, "include_dashboard": False})
        worker = cluster.add_node(**common)
        cluster.wait_for_nodes()
    finally:
        mp.undo()
    try:
        yield cluster, worker
    finally:
        cluster.shutdown()


def _data(tmp_path, n=32):
    inp = tmp_path / "in"
    write_shard(str(inp / "big.parquet"), n)
    pq.write_table(pq.read_table(inp / "big.parquet"), inp / "big.parquet", row_group_size=4)
    return inp


CLUSTER_SCRIPT = """
import sys
from grefine_curate.pipelines.faults import Delay
from grefine_curate.pipelines.job import JobConfig, run_job
s = run_job(JobConfig(inputs=[sys.argv[1]], out=sys.argv[2], preset="tiny", mode="score", executor="ray",
                      address=sys.argv[3], workers=2, batch_size=2, unit_rows=4, quiet=True,
                      batch_hook=Delay(float(sys.argv[4]))))
for line in s.lines():
    print(line)
sys.exit(s.exit_code)
"""


def _start(cluster, inp, out, delay="0.3") -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.path.join(ROOT, "src"), "RAY_USAGE_STATS_ENABLED": "0",
           # The nodes listen on 127.0.0.1 only; without this the driver swaps a loopback address for the
           # machine's own IP before connecting (Ray's resolve_ip_for_localhost).
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    # The job through its public API (the CLI builds the same JobConfig), with an injected delay per batch
    cmd = [sys.executable, "-c", CLUSTER_SCRIPT, str(inp), str(out), cluster.address, delay]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _check_exactly_once(out, n):
    got = pq.read_table(out / "big.parquet")
    assert got.column(C.ID).to_pylist() == [f"big.parquet#{i}" for i in range(n)]
    assert not [f for _, _, fs in os.walk(out) for f in fs if TMP_MARK in f]
    assert not (out / "__grefine__" / "units" / "big.parquet").exists()
    return json.loads((out / "__grefine__" / "shards" / "big.parquet.json").read_text())


def test_both_nodes_process_units(two_nodes, tmp_path):
    cluster, worker = two_nodes
    inp, out = _data(tmp_path), tmp_path / "out"
    proc = _start(cluster, inp, out, delay="0.2")
    log = proc.communicate(timeout=240)[0].decode()
    assert proc.returncode == 0, log[-3000:]
    marker = _check_exactly_once(out, 32)
    nodes = {u["node_id"] for u in marker["units"]}
    assert nodes == {cluster.head_node.node_id, worker.node_id}, marker["units"]
    assert len(marker["units"]) == 8 and all(u["attempt"] == 1 for u in marker["units"])


def test_losing_a_node_mid_job_redoes_only_its_unit(two_nodes, tmp_path):
    cluster, worker = two_nodes
    n = 40
    inp, out = _data(tmp_path, n), tmp_path / "out"
    proc = _start(cluster, inp, out)
    parts = out / "__grefine__" / "units" / "big.parquet"
    fs = pafs.LocalFileSystem()
    on_worker: dict[str, int] = {}
    t0 = time.monotonic()
    while time.monotonic() - t0 < 240 and not on_worker:
        for p in (parts.iterdir() if parts.exists() else []):
            if TMP_MARK in p.name:
                continue
            rec, _ = read_record(fs, str(p))
            if rec is not None and rec.get("node_id") == worker.node_id:
                on_worker[p.name] = rec["start"]
        if proc.poll() is not None:
            pytest.fail(f"job ended before the node was removed: {proc.stdout.read().decode()[-3000:]}")
        time.sleep(0.1)
    assert on_worker, "the worker node committed no unit in time"
    cluster.remove_node(worker, allow_graceful=False)  # the node is lost while working on its next unit
    log = proc.communicate(timeout=240)[0].decode()
    assert proc.returncode == 0, log[-3000:]
    marker = _check_exactly_once(out, n)
    units = {u["start"]: u for u in marker["units"]}
    assert len(units) == n // 4
    for start in on_worker.values():  # committed before the loss: kept, not redone
        assert units[start]["node_id"] == worker.node_id and units[start]["attempt"] == 1
    redone = [u for u in units.values() if u["attempt"] > 1]
    assert len(redone) == 1 and redone[0]["node_id"] == cluster.head_node.node_id, marker["units"]
    man = json.loads((out / "__grefine__" / "manifest.json").read_text())
    assert man["run"]["retries"] == 1 and man["run"]["units_run"] == n // 4 and man["state"] == "done"
    assert "worker died" in log  # said on the terminal, with the unit's shard
