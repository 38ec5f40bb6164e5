"""The curation job through the local executor: output contract, score mode, folders, resume,
config-change refusal, exit codes, and the shard processor's per-item isolation.

End-to-end tests use the real ``tiny`` preset (random-weight models built in code, loaded once per
test session thanks to the executor's engine cache); processor unit tests use a fake engine.
"""

from __future__ import annotations

import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from grefine_curate.curate.errors import ConfigError, InputError
from grefine_curate.pipelines import columns as C
from grefine_curate.pipelines import executors
from grefine_curate.pipelines.executors import Progress
from grefine_curate.pipelines.job import JobConfig, exit_code_for, run_job
from grefine_curate.pipelines.processor import ProcessOptions, ShardResult, ShardTask, process_shard
from grefine_curate.pipelines.sources import discover, resolve_fs
from job_corpus import FakeEngine, jpeg, write_dataset, write_folder, write_shard


def job(tmp_path, inputs, **kw) -> JobConfig:
    kw.setdefault("preset", "tiny")
    kw.setdefault("executor", "local")
    kw.setdefault("batch_size", 3)
    kw.setdefault("quiet", True)
    return JobConfig(inputs=[str(i) for i in inputs], out=str(kw.pop("out", tmp_path / "out")), **kw)


def files_under(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.fixture
def fake_engine(monkeypatch):
    eng = FakeEngine()
    monkeypatch.setattr(executors, "cached_engine", lambda spec: eng)
    return eng


# ---------------------------------------------------------------------------------------------
# Processor (fake engine)


def _run_shard(tmp_path, shard, engine, **kw) -> ShardResult:
    fs, root = resolve_fs(str(tmp_path / "out"))
    opts = ProcessOptions(**{"mode": "refine", "batch_size": 3, **kw})
    events = list(process_shard(ShardTask(shard=shard, out_fs=fs, out_root=root), engine, opts))
    assert all(isinstance(e, int) for e in events[:-1]) and sum(events[:-1]) == shard.num_rows
    return events[-1]


def test_model_failure_on_a_batch_is_isolated_to_the_bad_item(tmp_path):
    imgs = [jpeg(i) for i in range(7)]
    buf = io.BytesIO()
    Image.new("RGB", (13, 17), (9, 9, 9)).save(buf, format="PNG")
    imgs[4] = buf.getvalue()  # the engine raises on any batch holding a 13-px-wide image
    pq.write_table(pa.table({"image": imgs, "prompt": ["a cat"] * 7}), tmp_path / "s.parquet")
    shard = discover([str(tmp_path / "s.parquet")])[0]
    engine = FakeEngine(fail_width=13)
    res = _run_shard(tmp_path, shard, engine)
    t = pq.read_table(tmp_path / "out" / "s.parquet")
    status = t.column(C.STATUS).to_pylist()
    assert status == ["ok"] * 4 + ["error"] + ["ok"] * 2
    assert "simulated model failure" in t.column(C.ERROR)[4].as_py() and "s.parquet#4" in t.column(C.ERROR)[4].as_py()
    assert res.status == {"ok": 6, "error": 1}
    assert engine.batches[:2] == [3, 3] and engine.batches[2:5] == [1, 1, 1]  # batch 2 retried item by item


def test_hf_struct_column_gets_refined_bytes_and_a_path_naming_their_format(tmp_path):
    write_shard(str(tmp_path / "s.parquet"), 5, struct=True)
    shard = discover([str(tmp_path / "s.parquet")])[0]
    engine = FakeEngine()
    _run_shard(tmp_path, shard, engine, image_format="PNG")
    src = pq.read_table(tmp_path / "s.parquet")
    out = pq.read_table(tmp_path / "out" / "s.parquet")
    assert out.schema.field("image").type == src.schema.field("image").type
    for a, b, route in zip(src.column("image").to_pylist(), out.column("image").to_pylist(),
                           out.column(C.ROUTE).to_pylist()):
        if route in ("light", "full"):  # img0.jpg refined to PNG bytes is img0.png (issue 16)
            assert b["bytes"] != a["bytes"] and Image.open(io.BytesIO(b["bytes"])).format == "PNG"
            assert b["path"] == a["path"].rsplit(".", 1)[0] + ".png"
        else:
            assert b["bytes"] == a["bytes"] and b["path"] == a["path"]
    feats = json.loads(out.schema.metadata[b"huggingface"])["info"]["features"]
    assert feats["image"] == {"_type": "Image"} and feats[C.STATUS] == {"dtype": "string", "_type": "Value"}
    assert set(feats) == {"image", "prompt", *[f for f in out.column_names if f.startswith(("grefine", "pq", "aq", "unm"))]}
    assert set(engine.refined) == {f"s.parquet#{i}" for i, r in enumerate(out.column(C.ROUTE).to_pylist())
                                   if r != "skip"}


# ---------------------------------------------------------------------------------------------
# End to end, tiny preset


def test_refine_output_contract(tmp_path):
    from grefine_curate.curate.refiner import item_seed

    write_dataset(str(tmp_path / "in"), shards=2, rows=2)
    write_shard(str(tmp_path / "in" / "hf.parquet"), 2, start=50, struct=True)
    summary = run_job(job(tmp_path, [tmp_path / "in"], save_maps=True, batch_size=2))
    assert summary.exit_code == 0, summary.lines()
    rels = ["hf.parquet", "part-a/shard-000.parquet", "part-b/shard-001.parquet"]
    assert files_under(tmp_path / "out") == sorted(
        rels + ["__grefine__/manifest.json", "__grefine__/report.html"] + [f"__grefine__/shards/{r}.json" for r in rels])
    for rel in rels:
        src = pq.read_table(tmp_path / "in" / rel)
        out = pq.read_table(tmp_path / "out" / rel)
        assert out.num_rows == src.num_rows
        for name in src.column_names:  # every input column kept, in order, unchanged except the image
            assert out.schema.field(name).type == src.schema.field(name).type
            if name != "image":
                assert out.column(name).to_pylist() == src.column(name).to_pylist()
        for col in (C.STATUS, C.ERROR, C.ROUTE, C.PQ_SCORE, C.AQ_SCORE, C.PQ_SCORE_AFTER, C.AQ_SCORE_AFTER,
                    C.UNMATCHED, C.SEED, C.PQ_MAP, C.AQ_MAP):
            assert col in out.column_names
        rows = out.to_pylist()
        for i, (row, srow) in enumerate(zip(rows, src.to_pylist())):
            assert row[C.STATUS] == "ok" and row[C.ERROR] is None
            assert row[C.ROUTE] in C.ROUTES and 0.0 <= row[C.PQ_SCORE] <= 1.0 and 0.0 <= row[C.AQ_SCORE] <= 1.0
            assert row[C.SEED] == item_seed(0, f"{rel}#{i}")
            before = srow["image"]["bytes"] if rel == "hf.parquet" else srow["image"]
            after = row["image"]["bytes"] if rel == "hf.parquet" else row["image"]
            if row[C.ROUTE] in ("skip", "reverted"):
                assert after == before
            else:
                img = Image.open(io.BytesIO(after))
                assert img.format == "PNG" and img.size == Image.open(io.BytesIO(before)).size
            pmap = Image.open(io.BytesIO(row[C.PQ_MAP]))
            assert pmap.size == (64, 64) and pmap.mode == "L"
    man = json.loads((tmp_path / "out" / "__grefine__" / "manifest.json").read_text())
    assert man["state"] == "done" and man["config_hash"] == summary.config_hash
    assert man["counts"]["rows"] == 6 and man["counts"]["status"] == {"ok": 6}
    assert sum(man["counts"]["routes"].values()) == 6 and man["packages"]["pyarrow"] == pa.__version__
    assert man["models"]["clip"] == "tiny/random" and man["result_config"]["preset"]["name"] == "tiny"
    assert man["run"]["rows"] == 6 and man["run"]["items_per_s"] > 0


def test_score_mode_writes_ids_prompts_scores_and_compact_maps(tmp_path):
    write_dataset(str(tmp_path / "in"), shards=2, rows=4)
    summary = run_job(job(tmp_path, [tmp_path / "in"], mode="score", save_maps=True, id_column="row_key"))
    assert summary.exit_code == 0 and summary.rows == 8 and sum(summary.routes.values()) == 8  # planned routes
    out = pq.read_table(tmp_path / "out" / "part-b" / "shard-001.parquet")
    assert out.column_names == [C.ID, C.PROMPT, "prompt", "row_key", "meta", C.STATUS, C.ERROR, C.ROUTE,
                                C.ROUTE_PLANNED, C.PQ_SCORE, C.AQ_SCORE, C.UNMATCHED, C.PQ_MAP,
                                C.AQ_MAP]  # input columns but the image kept
    assert out.column(C.ID).to_pylist() == ["4", "5", "6", "7"]
    src = pq.read_table(tmp_path / "in" / "part-b" / "shard-001.parquet")
    assert out.column(C.PROMPT).to_pylist() == src.column("prompt").to_pylist()
    assert all(0 <= v <= 1 for v in out.column(C.PQ_SCORE).to_pylist())
    amap = Image.open(io.BytesIO(out.column(C.AQ_MAP)[0].as_py()))
    assert amap.size == (64, 64) and amap.mode == "L"
    kept = run_job(job(tmp_path, [tmp_path / "in"], out=tmp_path / "kept", mode="score", keep_images=True))
    assert kept.exit_code == 0
    out = pq.read_table(tmp_path / "kept" / "part-b" / "shard-001.parquet")
    assert out.column("image").to_pylist() == src.column("image").to_pylist()


def test_folder_input_mirrors_images_and_writes_scores(tmp_path):
    rels = write_folder(str(tmp_path / "imgs"), n=3)
    summary = run_job(job(tmp_path, [tmp_path / "imgs"], folder_shard_size=2))
    assert summary.exit_code == 0, summary.lines()
    assert files_under(tmp_path / "out" / "images") == sorted(rels)
    scores = pq.read_table(tmp_path / "out" / "scores").sort_by(C.ID)
    assert scores.column(C.SOURCE).to_pylist() == sorted(rels)
    assert all(p for p in scores.column(C.PROMPT).to_pylist())
    for row in scores.to_pylist():
        src = (tmp_path / "imgs" / row[C.SOURCE]).read_bytes()
        dst = (tmp_path / "out" / "images" / row[C.SOURCE]).read_bytes()
        if row[C.ROUTE] in ("skip", "reverted"):
            assert dst == src
        else:
            fmt = Image.open(io.BytesIO(dst)).format
            assert fmt == ("PNG" if row[C.SOURCE].endswith(".png") else "JPEG")


def test_resume_skips_complete_shards_and_ignores_stale_temporaries(tmp_path):
    write_dataset(str(tmp_path / "in"), shards=3, rows=2)
    cfg = job(tmp_path, [tmp_path / "in"], mode="score")
    first = run_job(cfg)
    assert first.shards_run == 3
    out = tmp_path / "out"
    marker = out / "__grefine__" / "shards" / "part-a" / "shard-000.parquet.json"
    before = {p: os.stat(out / p).st_mtime_ns for p in files_under(out) if not p.endswith("manifest.json")}
    # A killed run leaves a temporary beside an output, one shard incomplete (no output, no marker) and
    # one complete output whose marker was never written (killed between the rename and the marker).
    stale = out / "part-a" / ".shard-002.parquet.grefine-tmp-deadbeef"
    stale.write_bytes(b"PAR1 partial")
    os.remove(out / "part-a" / "shard-002.parquet")
    os.remove(out / "__grefine__" / "shards" / "part-a" / "shard-002.parquet.json")
    os.remove(out / "__grefine__" / "shards" / "part-b" / "shard-001.parquet.json")
    second = run_job(cfg)
    assert (second.shards_run, second.shards_skipped, second.removed_temporaries) == (1, 2, 1)
    assert second.adopted == 1  # the output is its own commit record: adopted, not recomputed
    assert os.stat(out / "part-b" / "shard-001.parquet").st_mtime_ns == before["part-b/shard-001.parquet"]
    assert json.loads((out / "__grefine__" / "shards" / "part-b" / "shard-001.parquet.json").read_text())["rows"] == 2
    assert not stale.exists()
    assert os.stat(marker).st_mtime_ns == before[str(marker.relative_to(out))]  # not recomputed
    assert os.stat(out / "part-a" / "shard-000.parquet").st_mtime_ns == before["part-a/shard-000.parquet"]
    assert second.rows == 6 and pq.read_table(out / "part-a" / "shard-002.parquet").num_rows == 2
    third = run_job(JobConfig(**{**cfg.__dict__, "resume": False}))
    assert third.shards_run == 3 and third.shards_skipped == 0


def test_config_change_is_refused_unless_forced(tmp_path):
    write_dataset(str(tmp_path / "in"), shards=1, rows=2)
    assert run_job(job(tmp_path, [tmp_path / "in"], mode="score")).exit_code == 0
    changed = job(tmp_path, [tmp_path / "in"], mode="score", overrides={"aq": {"beta": 0.3}})
    with pytest.raises(ConfigError) as e:
        run_job(changed)
    assert "preset.aq.beta: 0.5 -> 0.3" in str(e.value) and "--force" in str(e.value)
    assert exit_code_for(e.value) == 2
    changed.force = True
    forced = run_job(changed)
    assert forced.exit_code == 0 and forced.shards_run == 1
    man = json.loads((tmp_path / "out" / "__grefine__" / "manifest.json").read_text())
    assert man["result_config"]["preset"]["aq"]["beta"] == 0.3


def test_limit_takes_the_first_rows_in_input_order(tmp_path):
    write_dataset(str(tmp_path / "in"), shards=3, rows=4)
    s = run_job(job(tmp_path, [tmp_path / "in"], mode="score", limit=6))
    assert s.rows == 6 and s.shards_total == 2
    assert pq.read_table(tmp_path / "out" / "part-a" / "shard-000.parquet").num_rows == 4
    assert pq.read_table(tmp_path / "out" / "part-a" / "shard-002.parquet").num_rows == 2
    assert not (tmp_path / "out" / "part-b").exists()
    full = run_job(job(tmp_path, [tmp_path / "in"], mode="score"))
    assert full.rows == 12 and full.shards_skipped == 1  # the complete first shard is reused


def test_usage_errors_are_raised_before_any_work(tmp_path):
    write_dataset(str(tmp_path / "in"), shards=1, rows=2)
    with pytest.raises(InputError) as e:
        run_job(job(tmp_path, [tmp_path / "in"], prompt_column="caption"))
    assert "columns found: image (binary), prompt (string)" in str(e.value) and exit_code_for(e.value) == 2
    assert not (tmp_path / "out").exists()  # nothing written
    pq.write_table(pa.table({"image": pa.array([], pa.binary())}), tmp_path / "empty.parquet")
    with pytest.raises(InputError, match="no rows"):
        run_job(job(tmp_path, [tmp_path / "empty.parquet"]))
    for bad in ({"mode": "audit"}, {"executor": "spark"}, {"batch_size": 0}, {"max_error_rate": 2.0},
                {"image_format": "GIF"}, {"preset": "tinny"}, {"overrides": {"routing": {"light_p": 0.9}}}):
        with pytest.raises(ConfigError):
            run_job(job(tmp_path, [tmp_path / "in"], **bad))


def test_error_rate_and_failed_shard_exit_codes(tmp_path, fake_engine, monkeypatch):
    write_dataset(str(tmp_path / "in"), shards=2, rows=3)
    pq.write_table(pa.table({"image": [jpeg(0), b"broken", b""], "prompt": ["a", "b", "c"]}),
                   tmp_path / "in" / "z.parquet")
    s = run_job(job(tmp_path, [tmp_path / "in"], mode="score", max_error_rate=0.1))
    assert (s.exit_code, s.state, s.status) == (3, "error-rate", {"ok": 7, "error": 2})
    s = run_job(job(tmp_path, [tmp_path / "in"], out=tmp_path / "o2", mode="score", max_error_rate=0.5))
    assert s.exit_code == 0
    real = executors.process_shard

    def broken(task, engine, opts):
        if task.shard.rel == "z.parquet":
            raise OSError("disk full (simulated)")
        yield from real(task, engine, opts)

    monkeypatch.setattr(executors, "process_shard", broken)
    s = run_job(job(tmp_path, [tmp_path / "in"], out=tmp_path / "o3", mode="score"))
    assert s.exit_code == 1 and s.state == "failed" and s.shards_failed[0][0] == "z.parquet"
    assert s.shards_run == 2 and not (tmp_path / "o3" / "z.parquet").exists()
    man = json.loads((tmp_path / "o3" / "__grefine__" / "manifest.json").read_text())
    assert man["failures"][0]["shard"] == "z.parquet" and "disk full" in man["failures"][0]["error"]


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_bars_on_a_terminal_plain_lines_otherwise_nothing_when_quiet(monkeypatch):
    res = ShardResult(rel="a.parquet", rows=4, status={"ok": 3, "error": 1}, routes={}, seconds=0.5, output="x")
    tty = _Stream(True)
    p = Progress(total_items=8, total_shards=2, stream=tty)
    p.items(4)
    p.shard_done(res)
    p.close()
    assert "images" in tty.getvalue() and "img/s" in tty.getvalue() and "4/8" in tty.getvalue()
    monkeypatch.setattr(executors, "LOG_EVERY_S", 0.0)
    plain = _Stream(False)
    p = Progress(total_items=8, total_shards=2, stream=plain)
    p.items(4)
    p.shard_done(res)
    lines = plain.getvalue().splitlines()
    assert lines[0].startswith("progress: 4/8 images, 0/2 shards") and "ETA" in lines[0]
    assert lines[1] == "shard done: a.parquet (4 rows, 1 errors, 0.5s) [1/2]" and "\r" not in plain.getvalue()
    quiet = _Stream(False)
    p = Progress(total_items=8, total_shards=2, stream=quiet, quiet=True)
    p.items(4)
    p.shard_done(res)
    p.say("shard failed: x", always=True)
    assert quiet.getvalue() == "shard failed: x\n"


# ---------------------------------------------------------------------------------------------
# First-run bugs (issue #11)


def test_a_failed_start_does_not_lock_its_output_folder(tmp_path, monkeypatch):
    from grefine_curate.curate.errors import ModelUnavailableError

    write_dataset(str(tmp_path / "in"), shards=1, rows=2)

    def cannot_load(spec):
        raise ModelUnavailableError("weights of the stage-1 model are not available (simulated)")

    monkeypatch.setattr(executors, "cached_engine", cannot_load)
    with pytest.raises(ModelUnavailableError):
        run_job(job(tmp_path, [tmp_path / "in"], overrides={"aq": {"beta": 0.3}}))
    man = json.loads((tmp_path / "out" / "__grefine__" / "manifest.json").read_text())
    assert man["state"] == "failed" and "simulated" in man["error"]  # not "running" forever
    monkeypatch.undo()
    retry = run_job(job(tmp_path, [tmp_path / "in"]))  # another config, same OUT: nothing was written, no lock
    assert retry.exit_code == 0 and retry.rows == 2



def test_missing_weights_are_found_before_any_executor_starts(tmp_path, monkeypatch):
    from grefine_curate.curate.errors import ModelUnavailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_dataset(str(tmp_path / "in"), shards=1, rows=2)

    def no_start(*args, **kwargs):
        raise AssertionError("an executor was started before the weights were checked")

    monkeypatch.setattr(executors, "init_ray", no_start)
    monkeypatch.setattr(executors, "cached_engine", no_start)
    for mode in ("score", "refine"):  # the executors above fail the test if they are reached first
        with pytest.raises(ModelUnavailableError) as e:
            run_job(job(tmp_path, [tmp_path / "in"], preset="sdxl", executor="ray", mode=mode,
                        models_dir=str(tmp_path / "models")))
        msg = str(e.value)
        assert "ViT-B-16-quickgelu" in msg and str(tmp_path / "models") in msg and "models pull" in msg
    man = json.loads((tmp_path / "out" / "__grefine__" / "manifest.json").read_text())
    assert man["state"] == "failed" and "ModelUnavailableError" in man["error"]  # the failed start is recorded



def test_a_smaller_limit_never_shrinks_a_finished_output_silently(tmp_path):
    write_dataset(str(tmp_path / "in"), shards=2, rows=5)
    assert run_job(job(tmp_path, [tmp_path / "in"], mode="score")).rows == 10
    with pytest.raises(ConfigError) as e:
        run_job(job(tmp_path, [tmp_path / "in"], mode="score", limit=2))
    msg = str(e.value)
    assert "--limit 2" in msg and "part-a/shard-000.parquet" in msg and "5 rows" in msg and "--force" in msg
    assert pq.read_table(tmp_path / "out" / "part-a" / "shard-000.parquet").num_rows == 5  # untouched
    forced = run_job(job(tmp_path, [tmp_path / "in"], mode="score", limit=2, force=True))
    assert forced.rows == 2 and any("removed" in n and "--limit" in n for n in forced.notes)
    assert pq.read_table(tmp_path / "out" / "part-a" / "shard-000.parquet").num_rows == 2
    assert files_under(tmp_path / "out" / "part-b") == []  # the shard past the limit: removed, and said so
    assert files_under(tmp_path / "out" / "__grefine__" / "shards" / "part-b") == []



def test_a_smaller_limit_on_a_folder_leaves_no_stale_images(tmp_path):
    rels = write_folder(str(tmp_path / "imgs"), n=5)
    assert run_job(job(tmp_path, [tmp_path / "imgs"])).rows == 5
    with pytest.raises(ConfigError):
        run_job(job(tmp_path, [tmp_path / "imgs"], limit=2))
    assert len(files_under(tmp_path / "out" / "images")) == 5
    forced = run_job(job(tmp_path, [tmp_path / "imgs"], limit=2, force=True))
    assert forced.rows == 2
    assert files_under(tmp_path / "out" / "images") == sorted(rels)[:2]



def test_seed_is_exact_on_every_row_error_rows_included(tmp_path, fake_engine):
    import zlib

    rows = [jpeg(0), b"broken", jpeg(1)]
    pq.write_table(pa.table({"image": rows, "prompt": ["a cat", "a dog", "a cow"]}), tmp_path / "s.parquet")
    assert run_job(job(tmp_path, [tmp_path / "s.parquet"], max_error_rate=1.0)).exit_code == 0
    t = pq.read_table(tmp_path / "out" / "s.parquet")
    assert t.column(C.STATUS).to_pylist() == ["ok", "error", "ok"]
    df = t.to_pandas()
    assert str(df[C.SEED].dtype) == "int64"  # a null would make pandas read float64 and round the seed
    assert df[C.SEED].tolist() == [zlib.crc32(f"s.parquet#{i}".encode()) for i in range(3)]


def test_hugging_face_schema_metadata_is_kept_in_every_parquet_output(tmp_path):
    datasets = pytest.importorskip("datasets")
    write_shard(str(tmp_path / "in" / "hf.parquet"), 3, struct=True)
    for name, kw in (("kept", {"mode": "score", "keep_images": True}), ("scores", {"mode": "score"}),
                     ("refined", {"mode": "refine"})):
        assert run_job(job(tmp_path, [tmp_path / "in"], out=tmp_path / name, **kw)).exit_code == 0
        table = pq.read_table(tmp_path / name / "hf.parquet")
        assert b"huggingface" in (table.schema.metadata or {}), name
        ds = datasets.Dataset(table)  # raises when the declared features and the columns disagree
        has_image = "image" in table.column_names
        assert has_image == (name != "scores")
        if has_image:  # still an image to `datasets`, not a struct of bytes
            assert isinstance(ds.features["image"], datasets.Image), name
        assert ds.features["prompt"] == datasets.Value("string")


def test_an_id_column_is_picked_automatically_and_input_columns_are_kept_in_score_mode(tmp_path):
    (tmp_path / "in").mkdir()
    for i, id_name in enumerate(("id", "key", "uid")):
        pq.write_table(pa.table({"image": [jpeg(0), jpeg(1)], "prompt": ["a cat", "a dog"],
                                 id_name: [f"k{i}0", f"k{i}1"], "license": ["cc-by", "cc0"]}),
                       tmp_path / "in" / f"{id_name}.parquet")
    assert run_job(job(tmp_path, [tmp_path / "in"], mode="score")).exit_code == 0
    for i, id_name in enumerate(("id", "key", "uid")):
        out = pq.read_table(tmp_path / "out" / f"{id_name}.parquet")
        assert out.column(C.ID).to_pylist() == [f"k{i}0", f"k{i}1"]
        assert out.column(id_name).to_pylist() == [f"k{i}0", f"k{i}1"]  # the input's columns, for joins
        assert out.column("license").to_pylist() == ["cc-by", "cc0"] and "image" not in out.column_names
    bare = run_job(job(tmp_path, [tmp_path / "in"], out=tmp_path / "bare", mode="score", input_columns=False))
    assert bare.exit_code == 0
    out = pq.read_table(tmp_path / "bare" / "id.parquet")
    assert out.column_names == [C.ID, C.PROMPT, C.STATUS, C.ERROR, C.ROUTE, C.ROUTE_PLANNED, C.PQ_SCORE, C.AQ_SCORE,
                                C.UNMATCHED]


def test_out_equal_to_an_input_folder_is_said(tmp_path):
    write_folder(str(tmp_path / "imgs"), n=2)
    for out in (tmp_path / "imgs", tmp_path):  # the input folder itself, or a folder around it
        with pytest.raises(InputError) as e:
            run_job(job(tmp_path, [tmp_path / "imgs"], out=out))
        msg = str(e.value)
        assert "--out" in msg and str(tmp_path / "imgs") in msg and "no input found" not in msg
    assert not (tmp_path / "imgs" / "__grefine__").exists()


def test_no_resume_recomputes_a_changed_config_without_force(tmp_path):
    write_dataset(str(tmp_path / "in"), shards=1, rows=2)
    assert run_job(job(tmp_path, [tmp_path / "in"], mode="score")).exit_code == 0
    s = run_job(job(tmp_path, [tmp_path / "in"], mode="score", overrides={"aq": {"beta": 0.3}}, resume=False))
    assert s.exit_code == 0 and s.shards_run == 1  # every row is rewritten: nothing of two configs mixes
    man = json.loads((tmp_path / "out" / "__grefine__" / "manifest.json").read_text())
    assert man["result_config"]["preset"]["aq"]["beta"] == 0.3


def test_interrupted_summary_agrees_with_the_shards_on_disk(tmp_path, monkeypatch):
    """Ctrl-C with Ray: a worker may finish a shard the driver has not heard of yet; the summary counts
    complete shards from their markers, and says which are unfinished."""
    write_dataset(str(tmp_path / "in"), shards=3, rows=2)

    class Interrupted(executors.LocalExecutor):  # an injected executor
        def run(self, tasks, spec, opts, progress, finish=None):
            rep = super().run(tasks[:2], spec, opts, progress, finish)  # two shards finish on disk ...
            rep.results, rep.interrupted = rep.results[:1], True  # ... the driver saw one when Ctrl-C came
            return rep

    s = run_job(job(tmp_path, [tmp_path / "in"], mode="score", executor_impl=Interrupted()))
    assert (s.exit_code, s.rows, s.shards_run, s.rows_this_run) == (130, 4, 2, 4)
    assert s.lines()[0].startswith("interrupted: 4 rows in 2 of 3 shards") and "1 unfinished" in s.lines()[0]
    man = json.loads((tmp_path / "out" / "__grefine__" / "manifest.json").read_text())
    assert man["run"]["rows"] == 4 and man["run"]["shards_run"] == 2


def test_progress_bars_start_with_the_work_so_start_up_output_stays_readable():
    """Ray prints a notice while it starts (token authentication); bars drawn before it would be torn."""
    tty = _Stream(True)
    p = Progress(total_items=8, total_shards=2, stream=tty)
    assert tty.getvalue() == ""  # nothing drawn during start-up (Ray init, model loading)
    p.say("resume: 1 of 2 shards already complete")
    assert tty.getvalue() == "resume: 1 of 2 shards already complete\n"
    p.items(4)
    p.close()
    assert "4/8" in tty.getvalue() and "img/s" in tty.getvalue()


def test_a_complete_output_reruns_without_weights(tmp_path, monkeypatch):
    write_dataset(str(tmp_path / "in"), shards=1, rows=2)
    assert run_job(job(tmp_path, [tmp_path / "in"], mode="score")).exit_code == 0

    def missing(*args):
        raise AssertionError("weights checked although no shard is left to run")

    from grefine_curate.pipelines import job as job_module

    monkeypatch.setattr(job_module, "check_weights", missing)
    again = run_job(job(tmp_path, [tmp_path / "in"], mode="score"))
    assert again.exit_code == 0 and again.shards_skipped == 1
