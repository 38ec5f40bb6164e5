"""The job layer's own contracts (issue 14): the unit step without an executor, OUT as a data set,
resume bookkeeping, one output per input, and each bug the formats redesign fixed.

Every job here runs in-process with an injected fake engine and, where it matters, an injected
executor: no module is monkeypatched.
"""

from __future__ import annotations

import io
import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from grefine_curate.curate.errors import InputError
from grefine_curate.pipelines import columns as C
from grefine_curate.pipelines.executors import LocalExecutor
from grefine_curate.pipelines.export import export
from grefine_curate.pipelines.job import JobConfig, run_job
from grefine_curate.pipelines.processor import ProcessOptions, ShardTask, process_unit
from grefine_curate.pipelines.sources import discover
from grefine_curate.pipelines.work import Item, Shard
from job_corpus import FakeEngine, encode, rgb, write_folder, write_shard


def _fake(spec):
    return FakeEngine()


def _cfg(inp, out, **kw) -> JobConfig:
    kw.setdefault("mode", "score")
    return JobConfig(inputs=[str(i) for i in (inp if isinstance(inp, list) else [inp])], out=str(out), preset="tiny",
                     executor="local", batch_size=2, quiet=True, engine_factory=_fake, write_report=False, **kw)


def _files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(b, f), root) for b, _, fs in os.walk(root) for f in fs)


def test_process_unit_runs_on_an_in_memory_reader_and_store():
    """The step is a plain generator over (raw batch, items): no file, no executor, no real store."""
    from fsspec.implementations.memory import MemoryFileSystem

    fs = pafs.PyFileSystem(pafs.FSSpecHandler(MemoryFileSystem()))
    shard = Shard(format="imagefolder", fs=fs, path="/in", rel="scores/mem-00000.parquet", num_rows=3, source_key="k")
    items = [Item(item_id=f"x{i}.png", prompt="a red car", raw=encode(rgb(i)), source=f"x{i}.png") for i in range(2)]
    items.append(Item(item_id="bad.png", prompt=None, raw=b"not an image", source="bad.png"))
    task = ShardTask(shard=shard, out_fs=fs, out_root="/out")
    events = list(process_unit(task, None, iter([(None, items[:2]), (None, items[2:])]), FakeEngine(),
                               ProcessOptions(mode="score", batch_size=2)))
    assert events[:2] == [2, 1] and events[-1].status == {"ok": 2, "error": 1}
    with fs.open_input_file("/out/scores/mem-00000.parquet") as f:
        t = pq.read_table(f)
    assert t.column(C.ID).to_pylist() == ["x0.png", "x1.png", "bad.png"]
    assert t.column(C.STATUS).to_pylist() == ["ok", "ok", "error"]


def test_out_holds_only_data_parquet_a_two_pass_run_keeps_its_audit_under_another_name(tmp_path):
    """`OUT/**/*.parquet` (duckdb, polars) must see outputs only: parts and the inner audit are not *.parquet."""
    write_shard(str(tmp_path / "in" / "a.parquet"), 8)
    s = run_job(_cfg(tmp_path / "in", tmp_path / "out", mode="refine", refine_worst=0.25, unit_rows=4))
    assert s.exit_code == 0 and s.rows == 8
    parquet = [f for f in _files(tmp_path / "out") if f.endswith(".parquet")]
    assert parquet == ["a.parquet"], parquet
    assert any(f.startswith("__grefine__/audit/") and f.endswith(".scores") for f in _files(tmp_path / "out"))
    import pyarrow.dataset as ds

    assert ds.dataset(str(tmp_path / "out"), format="parquet").to_table().num_rows == 8
    again = run_job(_cfg(tmp_path / "in", tmp_path / "out", mode="refine", refine_worst=0.25, unit_rows=4))
    assert again.exit_code == 0 and again.shards_skipped == 1  # resumes with the audit under its own name


def test_interrupted_no_resume_run_reports_only_its_own_rows_and_leaves_no_orphan_parts(tmp_path):
    write_shard(str(tmp_path / "in" / "a.parquet"), 8)
    write_shard(str(tmp_path / "in" / "b.parquet"), 8)
    first = run_job(_cfg(tmp_path / "in", tmp_path / "out", unit_rows=4))
    assert first.exit_code == 0 and first.rows == 16

    class OneUnitThenCtrlC(LocalExecutor):  # an injected executor: one unit lands, then Ctrl-C
        def run(self, tasks, spec, opts, progress, finish=None):
            rep = super().run(tasks[:1], spec, opts, progress, finish)
            rep.interrupted = True
            return rep

    s = run_job(_cfg(tmp_path / "in", tmp_path / "out", unit_rows=4, resume=False, executor_impl=OneUnitThenCtrlC()))
    assert s.exit_code == 130
    assert (s.shards_run, s.rows_this_run) == (0, 4), s.lines()  # one unit of 4 rows; no shard of the earlier run
    done = run_job(_cfg(tmp_path / "in", tmp_path / "out", unit_rows=4))
    assert done.exit_code == 0 and done.rows == 16
    assert not [f for f in _files(tmp_path / "out") if f.startswith("__grefine__/units/")], "orphan parts left"


def test_imagefolder_out_loads_as_an_imagefolder_with_its_scores(tmp_path):
    write_folder(str(tmp_path / "photos"), n=4)
    s = run_job(_cfg(tmp_path / "photos", tmp_path / "out", mode="refine"))
    assert s.exit_code == 0
    from datasets import load_dataset

    d = load_dataset("imagefolder", data_dir=str(tmp_path / "out"))
    assert list(d) == ["train"] and d["train"].num_rows == 4
    assert {C.PQ_SCORE, C.ROUTE, C.PROMPT} <= set(d["train"].column_names)
    assert isinstance(d["train"][0]["image"], Image.Image)


def test_imagefolder_export_of_hub_named_shards_is_one_split_with_its_metadata(tmp_path):
    """Shards named train-*.parquet once gave images under train/ and maps under maps/train/: mixed rows, no metadata."""
    write_shard(str(tmp_path / "in" / "train-00000-of-00001.parquet"), 5)
    assert run_job(_cfg(tmp_path / "in", tmp_path / "out", save_maps=True, max_error_rate=1.0)).exit_code == 0
    export(str(tmp_path / "out"), str(tmp_path / "exp"), fmt="imagefolder", quiet=True)
    from datasets import load_dataset

    d = load_dataset("imagefolder", data_dir=str(tmp_path / "exp"))
    assert list(d) == ["train"] and d["train"].num_rows == 5
    row = d["train"][0]
    assert isinstance(row["image"], Image.Image) and isinstance(row["pq_map"], Image.Image) and row[C.PQ_SCORE] is not None


def test_webdataset_sidecar_columns_are_carried_into_the_output_sidecar(tmp_path):
    import tarfile

    (tmp_path / "in").mkdir()
    keys = [f"{i:04d}" for i in range(3)]
    with tarfile.open(tmp_path / "in" / "00000.tar", "w") as tf:
        for k in keys:
            for name, data in ((f"{k}.png", encode(rgb(int(k)))), (f"{k}.txt", b"a red car")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"key": keys, "url": [f"https://x/{k}" for k in keys], "sha256": ["0" * 64] * 3}),
                   tmp_path / "in" / "00000.parquet")
    assert run_job(_cfg(tmp_path / "in", tmp_path / "out")).exit_code == 0
    t = pq.read_table(tmp_path / "out" / "00000.parquet")
    assert t.column("url").to_pylist() == [f"https://x/{k}" for k in keys] and "sha256" in t.column_names


def test_two_images_of_one_folder_with_one_output_name_are_refused_naming_both(tmp_path):
    """`a:b.png` and `a_b.png` both became images/a_b.png: one image silently lost (issue 15 item 1)."""
    d = tmp_path / "photos"
    d.mkdir()
    for name, seed in (("a:b.png", 1), ("a_b.png", 2), ("c.png", 3), (" c.png", 4)):
        (d / name).write_bytes(encode(rgb(seed)))
    with pytest.raises(InputError) as e:
        discover([str(d)])
    msg = str(e.value)
    assert "a:b.png" in msg and "a_b.png" in msg and "/ c.png" in msg and "images/c.png" in msg
    assert not (tmp_path / "out").exists()


def test_out_as_an_s3_uri_is_never_a_local_folder(tmp_path, monkeypatch, capsys):
    """`--out s3://bucket/x` was a typer Path: folded to ./s3:/bucket/x on the local disk, exit 0."""
    import sys

    from grefine_curate.cli import main

    monkeypatch.chdir(tmp_path)
    write_shard(str(tmp_path / "in" / "a.parquet"), 2)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", ["grefine-curate", "score", str(tmp_path / "in"), "--out", "s3://bkt/x",
                                      "--preset", "tiny", "--executor", "local", "-q"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert not (tmp_path / "s3:").exists()
    assert e.value.code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "s3://bkt/x" in lines[0] and "http://127.0.0.1:9" in lines[0], err


def test_a_local_ray_instance_prints_no_token_authentication_notice():
    """Ray's notice that a local cluster uses token authentication tore the progress bar (issue 16)."""
    import subprocess
    import sys

    script = ("from grefine_curate.pipelines.executors import init_ray\nimport ray\ninit_ray()\nray.shutdown()\n")
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Token authentication" not in r.stderr + r.stdout


class _Watching(FakeEngine):
    """Records, at each scoring call, whether the next batch's items were already decoded."""

    def __init__(self, items, wait_s: float = 0.0):
        super().__init__()
        self.items, self.wait_s, self.next_decoded = items, wait_s, []

    def score(self, images, prompts):
        import time

        k = len(self.next_decoded)  # batch k is being scored (batch size 1)
        if k + 1 < len(self.items):
            t0 = time.monotonic()
            while self.items[k + 1].image is None and time.monotonic() - t0 < self.wait_s:
                time.sleep(0.01)
            self.next_decoded.append(self.items[k + 1].image is not None)
        return super().score(images, prompts)


@pytest.mark.parametrize("side,ahead", [(40, True), (70, False)])
def test_decoded_pixels_stay_within_one_batch_at_the_pixel_limit(side, ahead):
    """Issue 15: a batch is decoded ahead of the model only while both fit the unit's pixel budget."""
    from fsspec.implementations.memory import MemoryFileSystem

    fs = pafs.PyFileSystem(pafs.FSSpecHandler(MemoryFileSystem()))
    shard = Shard(format="imagefolder", fs=fs, path="/in", rel="scores/m-00000.parquet", num_rows=3, source_key="k")
    items = [Item(item_id=f"x{i}.png", prompt="a red car", raw=encode(rgb(i, (side, side))), source=f"x{i}.png")
             for i in range(3)]
    engine = _Watching(items, wait_s=2.0 if ahead else 0.3)
    # a budget of 80x80 pixels (the default's floor is two batches of 1024x1024: tests would need MP images)
    opts = ProcessOptions(mode="score", batch_size=1, pixel_budget=80 * 80)  # 40x40 twice fits; 70x70 once only
    events = list(process_unit(ShardTask(shard=shard, out_fs=fs, out_root="/o"), None,
                               iter([(None, [it]) for it in items]), engine, opts))
    assert engine.next_decoded == [ahead, ahead]
    assert events[-1].rows == 3


class _Counting(FakeEngine):
    """Records, at each scoring call, its size and how many of the unit's images are decoded."""

    def __init__(self, items):
        super().__init__()
        self.items, self.decoded = items, []

    def score(self, images, prompts):
        self.decoded.append(sum(it.image is not None for it in self.items))
        return super().score(images, prompts)


@pytest.mark.parametrize("mode", ["score", "refine"])
def test_a_batch_at_the_pixel_limit_is_scored_in_chunks_of_the_pixel_budget(mode):
    """Issue 15: full-size images held at once stay within two at the pixel limit whatever the batch
    size; a batch of large images goes to the models in chunks, and nothing is lost."""
    from fsspec.implementations.memory import MemoryFileSystem

    fs = pafs.PyFileSystem(pafs.FSSpecHandler(MemoryFileSystem()))
    shard = Shard(format="imagefolder", fs=fs, path="/in", rel="out/m-00000.parquet", num_rows=7, source_key="k")
    items = [Item(item_id=f"x{i}.png", prompt="a red car", raw=encode(rgb(i, (70, 70))), source=f"x{i}.png")
             for i in range(5)]
    items.insert(2, Item(item_id="big.png", prompt="a red car", raw=encode(rgb(9, (90, 90))), source="big.png"))
    items.insert(4, Item(item_id="bad.png", prompt="a red car", raw=b"not an image", source="bad.png"))
    engine = _Counting(items)
    # the budget of this limit with large images (budget_pixels' second term; its first, two batches of
    # 1024x1024, would need megapixel test images)
    opts = ProcessOptions(mode=mode, batch_size=7, max_pixels=70 * 70, pixel_budget=2 * 70 * 70)
    events = list(process_unit(ShardTask(shard=shard, out_fs=fs, out_root="/o"), None, iter([(None, items)]),
                               engine, opts))
    assert events[-1].rows == 7 and events[-1].status == {"ok": 5, "error": 2}
    assert "big.png" in items[2].error and "above the limit" in items[2].error
    assert engine.batches == [2, 2, 1]  # x0 x1 (big, never decoded) | x2 (bad) x3 | x4
    assert max(engine.decoded) <= 2


def test_jpegs_drafted_for_scoring_count_their_reduced_pixels():
    """Score mode decodes JPEGs DCT-scaled: the budget counts what they hold once decoded, so a batch
    of large JPEGs is not split for pixels it never holds."""
    from fsspec.implementations.memory import MemoryFileSystem

    fs = pafs.PyFileSystem(pafs.FSSpecHandler(MemoryFileSystem()))
    shard = Shard(format="imagefolder", fs=fs, path="/in", rel="out/m-00000.parquet", num_rows=4, source_key="k")
    items = [Item(item_id=f"x{i}.jpg", prompt="a red car", raw=encode(rgb(i, (80, 80)), "JPEG"), source=f"x{i}.jpg")
             for i in range(4)]
    engine = _Counting(items)
    opts = ProcessOptions(mode="score", batch_size=4, max_pixels=80 * 80, pixel_budget=2 * 80 * 80, draft_size=16)
    events = list(process_unit(ShardTask(shard=shard, out_fs=fs, out_root="/o"), None, iter([(None, items)]),
                               engine, opts))
    assert events[-1].status == {"ok": 4}
    assert engine.batches == [4]  # 4 x 20x20 drafted, not 4 x 80x80


def test_max_pixels_0_still_means_no_limit():
    """ProcessOptions(max_pixels=0) is no limit, as decode_image reads it: the unit runs, nothing refused."""
    from fsspec.implementations.memory import MemoryFileSystem

    fs = pafs.PyFileSystem(pafs.FSSpecHandler(MemoryFileSystem()))
    shard = Shard(format="imagefolder", fs=fs, path="/in", rel="out/m-00000.parquet", num_rows=3, source_key="k")
    items = [Item(item_id=f"x{i}.png", prompt="a red car", raw=encode(rgb(i, (60, 60))), source=f"x{i}.png")
             for i in range(3)]
    engine = FakeEngine()
    for mode in ("score", "refine"):
        events = list(process_unit(ShardTask(shard=shard, out_fs=fs, out_root=f"/o-{mode}"), None,
                                   iter([(None, [Item(**vars(it)) for it in items])]), engine,
                                   ProcessOptions(mode=mode, batch_size=3, max_pixels=0)))
        assert events[-1].status == {"ok": 3}, mode
    assert engine.batches == [3, 3]


class _Reducing(FakeEngine):
    """Refines from a reduced image (``refine_input``) and records, at each refine call, the chunk,
    how many of the batch's full-size originals are still held, and whether the items refined
    before were already encoded (their full-size outputs gone)."""

    def __init__(self, items):
        super().__init__()
        self.items, self.calls = items, []

    def refine_input(self, image):
        return image.resize((16, 16))

    def refine(self, requests):
        full = self.items[0].size
        self.calls.append({
            "chunk": [r.item_id for r in requests],
            "originals": sum(it.image is not None and it.image.size == full for it in self.items),
            "earlier_encoded": [it.encoded is not None and it.refined is None
                                for it in self.items if it.item_id in self.refined],
        })
        outs = super().refine(requests)
        for r, o in zip(requests, outs):
            if o.image is not None:
                o.image = o.image.resize(r.size)  # back to the original's size, as the refiner does
        return outs


@pytest.mark.parametrize("side,chunks", [(70, [1, 1, 1]), (30, [3])])
def test_refinement_holds_one_full_size_output_at_a_time_at_the_pixel_limit(side, chunks):
    """Issue 15: once scored, a refined item's original is reduced to where refinement starts, and
    refinement runs in chunks of at most one image at the pixel limit, each encoded before the next."""
    from fsspec.implementations.memory import MemoryFileSystem

    fs = pafs.PyFileSystem(pafs.FSSpecHandler(MemoryFileSystem()))
    shard = Shard(format="imagefolder", fs=fs, path="/in", rel="out/m-00000.parquet", num_rows=3, source_key="k")
    items = [Item(item_id=f"x{i}.png", prompt="a red car", raw=encode(rgb(i, (side, side))), source=f"x{i}.png")
             for i in range(3)]
    engine = _Reducing(items)
    opts = ProcessOptions(mode="refine", batch_size=3, max_pixels=70 * 70)
    events = list(process_unit(ShardTask(shard=shard, out_fs=fs, out_root="/o"), None, iter([(None, items)]),
                               engine, opts))
    assert events[-1].rows == 3 and events[-1].status == {"ok": 3}
    assert [len(c["chunk"]) for c in engine.calls] == chunks
    assert all(c["originals"] == 0 for c in engine.calls)  # every original released before refining
    assert all(all(c["earlier_encoded"]) for c in engine.calls)
    written = [it.item_id for it in items if it.route in ("light", "full")]
    assert written and sorted(engine.refined) == sorted(written)
    for rel in written:
        with fs.open_input_stream(f"/o/images/{rel}") as f:
            assert Image.open(io.BytesIO(f.read())).size == (side, side)  # outputs at the original size
