"""The curation job on Ray (the session's one local Ray instance): same output as the local
executor, and a worker dying mid-shard is replaced, its shard retried, and the job finishes."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from grefine_curate.pipelines import columns as C
from grefine_curate.pipelines.job import JobConfig, run_job
from grefine_curate.pipelines.faults import DieOnce, NoModels
from grefine_curate.pipelines.sources import TMP_MARK
from job_corpus import write_dataset, write_folder

pytestmark = pytest.mark.ray

SHARDS = ["part-a/shard-000.parquet", "part-a/shard-002.parquet", "part-b/shard-001.parquet"]


@pytest.fixture
def fresh_local_engine(monkeypatch):
    """The local side of a Ray-vs-local comparison loads its models afresh, as the actors do: an engine cached
    by earlier tests holds text features computed in other batch compositions, whose last bits differ, and a
    borderline phrase of the random tiny CLIP then flips "unmatched" (or a refined pixel moves)."""
    from grefine_curate.pipelines import executors

    monkeypatch.setattr(executors, "_ENGINE_CACHE", {})


def test_ray_matches_local_and_survives_a_worker_death(tmp_path, ray_session, monkeypatch, fresh_local_engine):
    inp = tmp_path / "in"
    write_dataset(str(inp), shards=3, rows=4)
    write_folder(str(tmp_path / "in-folder"), n=3)
    sentinel = tmp_path / "died-once"
    common = dict(inputs=[str(inp), str(tmp_path / "in-folder")], preset="tiny", mode="score", batch_size=2,
                  quiet=True, save_maps=True, keep_images=True)
    ray_sum = run_job(JobConfig(out=str(tmp_path / "ray"), executor="ray", workers=2,  # injected: reaches the actors
                                batch_hook=DieOnce(str(sentinel)), **common))
    assert sentinel.exists(), "the test hook did not fire: no worker died"
    assert ray_sum.exit_code == 0, ray_sum.lines()
    assert ray_sum.retries == 1 and ray_sum.shards_run == 4 and ray_sum.rows == 15
    assert not [f for _, _, fs in os.walk(tmp_path / "ray") for f in fs if TMP_MARK in f]
    man = json.loads((tmp_path / "ray" / "__grefine__" / "manifest.json").read_text())
    assert man["run"]["executor"] == "ray" and man["run"]["workers"] == 2 and man["run"]["retries"] == 1

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the 2 actors (2 CPUs / 2 actors): reductions sum in the same order
    try:
        local_sum = run_job(JobConfig(out=str(tmp_path / "local"), executor="local", **common))
    finally:
        torch.set_num_threads(threads)
    assert local_sum.exit_code == 0
    for rel in SHARDS + ["scores/in-folder-00000.parquet"]:
        r = pq.read_table(tmp_path / "ray" / rel)
        loc = pq.read_table(tmp_path / "local" / rel)
        if rel in SHARDS:
            assert r.column(C.ID).to_pylist() == [f"{rel}#{i}" for i in range(4)]  # exactly once, in order
            assert r.column("image").to_pylist() == pq.read_table(inp / rel).column("image").to_pylist()
        assert r.column(C.ID).to_pylist() == loc.column(C.ID).to_pylist()
        for col in (C.PQ_SCORE, C.AQ_SCORE):
            assert r.column(col).to_pylist() == pytest.approx(loc.column(col).to_pylist(), rel=1e-4, abs=1e-6)
        assert r.column(C.UNMATCHED).to_pylist() == loc.column(C.UNMATCHED).to_pylist()
    # The folder's images are mirrored (score mode copies them only with keep_images)
    for rel in ("img_00.png", "sub/img_01.jpg", "img_02.jpg"):
        assert (tmp_path / "ray" / "images" / rel).read_bytes() == (tmp_path / "in-folder" / rel).read_bytes()


def test_ray_refine_mode_matches_local(tmp_path, ray_session, fresh_local_engine):
    """Refine mode through Ray actors (diffusion included) gives the local executor's pixels and routes."""
    inp = tmp_path / "in"
    write_dataset(str(inp), shards=2, rows=3)
    common = dict(inputs=[str(inp)], preset="tiny", mode="refine", batch_size=3, quiet=True)
    ray_sum = run_job(JobConfig(out=str(tmp_path / "ray"), executor="ray", workers=1, **common))
    local_sum = run_job(JobConfig(out=str(tmp_path / "local"), executor="local", **common))
    assert ray_sum.exit_code == 0 and local_sum.exit_code == 0, ray_sum.lines()
    assert ray_sum.routes == local_sum.routes and sum(ray_sum.routes.values()) == 6
    for rel in ("part-a/shard-000.parquet", "part-b/shard-001.parquet"):
        r, loc = pq.read_table(tmp_path / "ray" / rel), pq.read_table(tmp_path / "local" / rel)
        assert r.column(C.ROUTE).to_pylist() == loc.column(C.ROUTE).to_pylist()
        assert r.column("image").to_pylist() == loc.column("image").to_pylist()  # same seeds, same pixels


def test_ray_quantile_routing_matches_local(tmp_path, ray_session, fresh_local_engine):
    """--refine-worst through Ray actors: the score pass and the refine pass reading it give the local
    executor's thresholds, routes and pixels."""
    inp = tmp_path / "in"
    write_dataset(str(inp), shards=2, rows=3)
    common = dict(inputs=[str(inp)], preset="tiny", batch_size=3, quiet=True, refine_worst=0.2)
    ray_sum = run_job(JobConfig(out=str(tmp_path / "ray"), executor="ray", workers=1, **common))
    local_sum = run_job(JobConfig(out=str(tmp_path / "local"), executor="local", **common))
    assert ray_sum.exit_code == 0 and local_sum.exit_code == 0, ray_sum.lines()
    man = [json.loads((tmp_path / w / "__grefine__" / "manifest.json").read_text()) for w in ("ray", "local")]
    assert man[0]["routing"]["thresholds"] == pytest.approx(man[1]["routing"]["thresholds"])
    assert ray_sum.routes == local_sum.routes
    for rel in ("part-a/shard-000.parquet", "part-b/shard-001.parquet"):
        r, loc = pq.read_table(tmp_path / "ray" / rel), pq.read_table(tmp_path / "local" / rel)
        assert r.column(C.ROUTE).to_pylist() == loc.column(C.ROUTE).to_pylist()
        assert r.column("image").to_pylist() == loc.column("image").to_pylist()


def test_ray_reuse_of_an_audit_with_nothing_to_refine_loads_no_model(tmp_path, ray_session, monkeypatch):
    inp = tmp_path / "in"
    write_dataset(str(inp), shards=2, rows=3)
    common = dict(inputs=[str(inp)], preset="tiny", batch_size=3, quiet=True)
    assert run_job(JobConfig(out=str(tmp_path / "audit"), mode="score", executor="local", **common)).exit_code == 0
    s = run_job(JobConfig(out=str(tmp_path / "out"), executor="ray", workers=1, scores=str(tmp_path / "audit"),
                          refine_worst=0.0, engine_factory=NoModels(), **common))  # building models raises
    assert s.exit_code == 0 and s.routes == {"skip": 6}, s.lines()
