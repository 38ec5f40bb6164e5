"""A job's OUT folder is a data set as it stands: pandas, pyarrow.dataset and Hugging Face datasets
read it without tripping over the job's own files (state and report live in OUT/__grefine__/)."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grefine_curate.pipelines import columns as C
from grefine_curate.pipelines.job import JobConfig, run_job
from job_corpus import write_dataset


def _run(tmp_path, out, mode="refine", **kw):
    cfg = JobConfig(inputs=[str(tmp_path / "in")], out=str(out), mode=mode, preset="tiny", executor="local",
                    batch_size=3, quiet=True, **kw)
    summary = run_job(cfg)
    assert summary.exit_code == 0, summary.lines()
    return summary


def _read_three_ways(out, tmp_path) -> list[int]:
    import pandas as pd
    import pyarrow.dataset as ds

    datasets = pytest.importorskip("datasets")
    n_pd = len(pd.read_parquet(out))
    n_ds = ds.dataset(str(out)).to_table().num_rows
    hf = datasets.load_dataset("parquet", data_dir=str(out), cache_dir=str(tmp_path / "hf-cache"))
    return [n_pd, n_ds, hf["train"].num_rows]


@pytest.mark.parametrize("mode", ["refine", "score"])
def test_out_folder_reads_with_pandas_pyarrow_and_datasets(tmp_path, mode):
    write_dataset(str(tmp_path / "in"), shards=2, rows=3)
    out = tmp_path / "out"
    _run(tmp_path, out, mode=mode, save_maps=True)
    assert (out / "__grefine__" / "report.html").is_file() and (out / "__grefine__" / "manifest.json").is_file()
    assert not (out / "report.html").exists()
    assert _read_three_ways(out, tmp_path) == [6, 6, 6]


def test_out_folder_of_a_quantile_run_reads_without_its_inner_audit(tmp_path):
    """The score pass of --refine-worst lives in OUT/__grefine__/audit, its outputs named *.scores: the readers
    skip it, and so does a '**/*.parquet' glob (duckdb, polars)."""
    write_dataset(str(tmp_path / "in"), shards=2, rows=3)
    out = tmp_path / "out"
    _run(tmp_path, out, refine_worst=0.0)
    assert list((out / "__grefine__" / "audit").rglob("*.scores"))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet")) == [
        "part-a/shard-000.parquet", "part-b/shard-001.parquet"]
    assert _read_three_ways(out, tmp_path) == [6, 6, 6]


def test_legacy_layout_is_moved_and_resumed(tmp_path):
    """An OUT written with state in _grefine/ and OUT/report.html resumes (no shard recomputed) and reads."""
    write_dataset(str(tmp_path / "in"), shards=2, rows=2)
    out = tmp_path / "out"
    _run(tmp_path, out, mode="score")
    os.rename(out / "__grefine__", out / "_grefine")  # what an earlier version left
    (out / "_grefine" / "report.html").rename(out / "report.html")
    summary = _run(tmp_path, out, mode="score")
    assert summary.shards_run == 0 and summary.shards_skipped == 2
    assert not (out / "_grefine").exists() and not (out / "report.html").exists()
    assert json.loads((out / "__grefine__" / "manifest.json").read_text())["counts"]["rows"] == 4
    assert _read_three_ways(out, tmp_path) == [4, 4, 4]
