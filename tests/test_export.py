"""`grefine-curate export`: a job's OUT as a training data set (parquet / webdataset / imagefolder),
read back with the readers people use; error rows and --where left out and counted."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from grefine_curate.curate.errors import ConfigError
from grefine_curate.pipelines import columns as C
from grefine_curate.pipelines import executors
from grefine_curate.pipelines.export import export
from grefine_curate.pipelines.job import JobConfig, run_job
from job_corpus import FakeEngine, write_bad_shard, write_dataset, write_folder


@pytest.fixture
def fake_engine(monkeypatch):
    eng = FakeEngine()
    monkeypatch.setattr(executors, "cached_engine", lambda spec: eng)
    return eng


def run(tmp_path, out, inputs, **kw):
    kw.setdefault("max_error_rate", 1.0)
    s = run_job(JobConfig(inputs=[str(i) for i in inputs], out=str(tmp_path / out), preset="tiny", executor="local",
                          batch_size=4, quiet=True, **kw))
    assert s.exit_code == 0, s.lines()
    return s


@pytest.fixture
def refined(tmp_path, fake_engine):
    """A refine OUT with maps: 2 clean shards (with passthrough columns) and a shard of bad inputs."""
    write_dataset(str(tmp_path / "in"), shards=2, rows=5)
    corpus = write_bad_shard(str(tmp_path / "bad" / "bad.parquet"))
    run(tmp_path, "out", [tmp_path / "in"], save_maps=True)
    run(tmp_path, "outbad", [tmp_path / "bad"])
    return corpus


def test_parquet_export_reads_in_datasets_as_images(tmp_path, refined):
    datasets = pytest.importorskip("datasets")
    s = export(str(tmp_path / "out"), str(tmp_path / "ds"), quiet=True)
    assert s.rows_written == 10 and s.errors_left_out == 0 and s.files == 2
    ds = datasets.load_dataset("parquet", data_dir=str(tmp_path / "ds"), cache_dir=str(tmp_path / "cache"))["train"]
    assert ds.num_rows == 10
    assert isinstance(ds.features["image"], datasets.Image) and isinstance(ds.features[C.PQ_MAP], datasets.Image)
    row = ds[0]
    assert isinstance(row["image"], Image.Image) and row[C.PQ_MAP].size == (64, 64)
    assert {"prompt", "row_key", "meta", C.PQ_SCORE, C.PQ_SCORE_AFTER, C.ROUTE, C.UNMATCHED} <= set(ds.column_names)
    assert C.STATUS not in ds.column_names and C.ERROR not in ds.column_names
    # the final image is the one in OUT (refined where refined)
    out = pq.read_table(tmp_path / "out" / "part-a" / "shard-000.parquet")
    exp = pq.read_table(tmp_path / "ds" / "part-a" / "shard-000.parquet")
    assert [v["bytes"] for v in exp.column("image").to_pylist()] == out.column("image").to_pylist()
    assert exp.column("row_key").to_pylist() == out.column("row_key").to_pylist()


def test_error_rows_and_where_are_left_out_and_counted(tmp_path, refined):
    corpus = refined
    n_err = sum(c[3] == "error" for c in corpus)
    s = export(str(tmp_path / "outbad"), str(tmp_path / "e1"), quiet=True)
    assert s.rows_in == len(corpus) and s.errors_left_out == n_err and s.rows_written == len(corpus) - n_err
    assert f"{n_err} error rows" in s.lines()[1]
    out = pq.ParquetDataset(str(tmp_path / "out")).read().to_pydict()
    cond = [p is not None and p >= 0.4 and r != "reverted" for p, r in zip(out[C.PQ_SCORE_AFTER], out[C.ROUTE])]
    s = export(str(tmp_path / "out"), str(tmp_path / "e2"), where="pq_score_after >= 0.4 and grefine_route != 'reverted'",
               quiet=True)
    assert s.rows_written == sum(cond) and s.where_left_out == 10 - sum(cond)
    got = pq.ParquetDataset(str(tmp_path / "e2")).read()
    assert all(v >= 0.4 for v in got.column(C.PQ_SCORE_AFTER).to_pylist())


def test_bad_where_and_bad_destination_are_usage_errors(tmp_path, refined):
    with pytest.raises(ConfigError, match="no column 'pq_scor'"):
        export(str(tmp_path / "out"), str(tmp_path / "x1"), where="pq_scor >= 0.6", quiet=True)
    with pytest.raises(ConfigError, match="position"):
        export(str(tmp_path / "out"), str(tmp_path / "x1"), where="__import__('os').system('true')", quiet=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not an empty folder"):
        export(str(tmp_path / "out"), str(tmp_path / "full"), quiet=True)
    with pytest.raises(ConfigError, match="inside OUT"):
        export(str(tmp_path / "out"), str(tmp_path / "out" / "ds"), quiet=True)
    assert not (tmp_path / "x1").exists()


def test_webdataset_export(tmp_path, refined):
    s = export(str(tmp_path / "out"), str(tmp_path / "wds"), fmt="webdataset", quiet=True)
    tars = sorted((tmp_path / "wds").rglob("*.tar"))
    assert s.rows_written == 10 and len(tars) == 2
    with tarfile.open(tars[0]) as tf:
        names = tf.getnames()
        keys = sorted({n.split(".", 1)[0] for n in names})
        assert len(keys) == 5
        k = keys[0]
        assert {f"{k}.jpg" if f"{k}.jpg" in names else f"{k}.png", f"{k}.json", f"{k}.txt", f"{k}.pq_map.png",
                f"{k}.aq_map.png"} <= set(names)
        meta = json.loads(tf.extractfile(f"{k}.json").read())
        assert {"prompt", "row_key", C.PQ_SCORE, C.ROUTE} <= set(meta)
        img = next(n for n in names if n.startswith(k) and n.endswith((".jpg", ".png")) and ".pq_map" not in n
                   and ".aq_map" not in n)
        Image.open(io.BytesIO(tf.extractfile(img).read())).verify()


def test_imagefolder_export_of_a_folder_run_reads_in_datasets(tmp_path, fake_engine):
    datasets = pytest.importorskip("datasets")
    write_folder(str(tmp_path / "imgs"), n=5)
    run(tmp_path, "fout", [tmp_path / "imgs"], save_maps=True)
    s = export(str(tmp_path / "fout"), str(tmp_path / "if"), fmt="imagefolder", quiet=True)
    assert s.rows_written == 5 and s.files == 5 * 3 + 1  # images, two maps each, metadata.jsonl
    ds = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "if"), cache_dir=str(tmp_path / "cache"))["train"]
    assert ds.num_rows == 5 and isinstance(ds[0]["image"], Image.Image)
    assert {C.PROMPT, C.SOURCE, C.PQ_SCORE} <= set(ds.column_names)
    assert isinstance(ds.features[C.PQ_MAP], datasets.Image) and ds[0][C.AQ_MAP].size == (64, 64)
    # the final image is the folder run's output image
    first = ds.sort(C.SOURCE)[0]
    assert first[C.SOURCE] == "img_00.png"
    assert first["image"].tobytes() == Image.open(tmp_path / "fout" / "images" / "img_00.png").convert(
        first["image"].mode).tobytes()


def test_export_of_a_score_run_takes_images_and_columns_from_the_input(tmp_path, fake_engine):
    write_dataset(str(tmp_path / "in"), shards=1, rows=4)
    run(tmp_path, "audit", [tmp_path / "in"], mode="score")
    s = export(str(tmp_path / "audit"), str(tmp_path / "ds"), where="row_key >= 1", quiet=True)
    assert s.rows_written == 3 and s.where_left_out == 1
    src = pq.read_table(tmp_path / "in" / "part-a" / "shard-000.parquet")
    exp = pq.read_table(tmp_path / "ds" / "part-a" / "shard-000.parquet")
    assert [v["bytes"] for v in exp.column("image").to_pylist()] == src.column("image").to_pylist()[1:]
    assert exp.column("meta").to_pylist() == src.column("meta").to_pylist()[1:]


def test_export_cli(tmp_path, refined, capsys):
    from grefine_curate.cli import app

    code = app(["export", str(tmp_path / "outbad"), "--to", str(tmp_path / "c"), "--quiet"], standalone_mode=False)
    out = capsys.readouterr().out
    assert code in (0, None) and "exported" in out and "error rows" in out
