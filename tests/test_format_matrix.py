"""Every command on every registered format, on the local disk and on S3 (issue 14).

One cell = one format x one store: `score` -> `run --scores --refine-worst` -> `export` in all three
formats, read back with pyarrow / PIL / tarfile -> the report with its originals -> a job killed
(the process dies mid-unit, as kill -9 would) and resumed, every row exactly once.

The cells run in-process through the public API (JobConfig / run_job, export, write_report) with an
injected fake engine (seconds per cell); the kill runs the job in a forked child that dies in a
batch hook. A format added to the registry without a corpus builder below fails here: a new
format gets the whole matrix.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import tarfile

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from grefine_curate.pipelines import columns as C
from grefine_curate.pipelines.export import FORMATS as EXPORT_FORMATS
from grefine_curate.pipelines.export import export
from grefine_curate.pipelines.faults import DieOnce
from grefine_curate.pipelines.formats import REGISTRY
from grefine_curate.pipelines.job import JobConfig, run_job
from grefine_curate.pipelines.job_view import open_job
from grefine_curate.pipelines.report import write_report
from job_corpus import FakeEngine, encode, rgb

N = 8  # items per corpus; the last one is not an image (an error row)
PROMPTS = ["a red car on a street", "a cat on a sofa", "two dogs in a park", "a bowl of fruit"]


def _image(i: int) -> bytes:
    return encode(rgb(i, (40 + 4 * i, 32)), "PNG")


def _items():
    return [(f"item{i:02d}", _image(i) if i < N - 1 else b"this is not an image\n" * 4, PROMPTS[i % 4])
            for i in range(N)]


# ---------------------------------------------------------------------------------------------
# One corpus per format (local folder `root`; returns the input path relative to it)


def _parquet(root: str) -> str:
    items = _items()
    t = pa.table({"id": [k for k, _, _ in items], "image": [b for _, b, _ in items],
                  "prompt": [p for _, _, p in items], "licence": ["cc-by"] * N})
    os.makedirs(f"{root}/data", exist_ok=True)
    pq.write_table(t, f"{root}/data/train-00000.parquet", row_group_size=3)
    return "data"


def _parquet_paths(root: str) -> str:
    """Hugging Face image structs that hold a path only (what `Dataset.to_parquet` writes for files)."""
    items = _items()
    os.makedirs(f"{root}/data/img", exist_ok=True)
    for k, b, _ in items:
        with open(f"{root}/data/img/{k}.png", "wb") as f:
            f.write(b)
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    t = pa.table({"id": [k for k, _, _ in items],
                  "image": pa.array([{"bytes": None, "path": f"img/{k}.png"} for k, _, _ in items], struct),
                  "prompt": [p for _, _, p in items]})
    feats = {"image": {"_type": "Image"}, "prompt": {"dtype": "string", "_type": "Value"},
             "id": {"dtype": "string", "_type": "Value"}}
    t = t.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": feats}})})
    pq.write_table(t, f"{root}/data/train-00000.parquet", row_group_size=3)
    return "data/train-00000.parquet"  # the file: its folder also holds the images it names


def _folder(root: str) -> str:
    os.makedirs(f"{root}/photos", exist_ok=True)
    with open(f"{root}/photos/metadata.jsonl", "w") as meta:
        for k, b, p in _items():
            with open(f"{root}/photos/{k}.png", "wb") as f:
                f.write(b)
            meta.write(json.dumps({"file_name": f"{k}.png", "text": p}) + "\n")
    return "photos"


def _webdataset(root: str) -> str:
    """An img2dataset-style shard: the tar and its Parquet sidecar (url, width)."""
    os.makedirs(f"{root}/shards", exist_ok=True)
    with tarfile.open(f"{root}/shards/00000.tar", "w") as tf:
        for k, b, p in _items():
            for name, data in ((f"{k}.png", b), (f"{k}.txt", p.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"key": [k for k, _, _ in _items()], "url": [f"https://x/{k}" for k, _, _ in _items()],
                             "width": [40 + 4 * i for i in range(N)]}), f"{root}/shards/00000.parquet")
    return "shards"


def _arrow_dataset(root: str) -> str:
    import datasets

    items = _items()
    ds = datasets.Dataset.from_dict({"id": [k for k, _, _ in items], "image": [b for _, b, _ in items],
                                     "prompt": [p for _, _, p in items]})
    ds.save_to_disk(f"{root}/saved", num_shards=2)  # two .arrow files
    return "saved"


BUILDERS = {"parquet": _parquet, "imagefolder": _folder, "webdataset": _webdataset, "arrow-dataset": _arrow_dataset}
CORPORA = [(name, BUILDERS.get(name)) for name in REGISTRY] + [("parquet-paths", _parquet_paths)]


def test_every_registered_format_has_a_corpus():
    missing = [name for name in REGISTRY if name not in BUILDERS]
    assert not missing, f"register a corpus builder in BUILDERS for {missing}: every format gets the whole matrix"


# ---------------------------------------------------------------------------------------------
# Stores


def _store(store: str, request, tmp_path):
    """(filesystem, URI prefix, path prefix) where the cell keeps its data."""
    if store == "local":
        return pafs.LocalFileSystem(), str(tmp_path), str(tmp_path)
    fs = request.getfixturevalue("s3_server")[1]  # the session's moto server (conftest.py)
    bucket = "m-" + request.node.callspec.id.lower().replace("_", "-").replace("[", "").replace("]", "")[:50]
    fs.create_dir(bucket)
    return fs, f"s3://{bucket}", bucket


def _upload(fs, local_root: str, dest: str) -> None:
    for base, _, files in os.walk(local_root):
        for name in files:
            src = os.path.join(base, name)
            with open(src, "rb") as f, fs.open_output_stream(f"{dest}/{os.path.relpath(src, local_root)}") as out:
                out.write(f.read())


def _read(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _files(fs, root: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(i.path[len(root.rstrip("/")) + 1:] for i in infos if i.type == pafs.FileType.File)


# ---------------------------------------------------------------------------------------------
# The cell


def _cfg(inp: str, out: str, **kw) -> JobConfig:
    kw.setdefault("mode", "refine")
    return JobConfig(inputs=[inp], out=out, preset="tiny", executor="local", batch_size=2, quiet=True,
                     engine_factory=_fake, write_report=False, **kw)


def _fake(spec):
    return FakeEngine()


def _ids(out_uri: str) -> list[str]:
    """Every row's item id over the job's outputs (each format names it: id, key)."""
    job = open_job(out_uri)
    ids = []
    for v in job.outputs:
        with v.out_fs.open_input_file(v.path) as f:
            t = pq.ParquetFile(f).read()
        col = next(c for c in (C.KEY, C.ID, "id") if c in t.column_names)
        ids += [os.path.splitext(str(x))[0] for x in t.column(col).to_pylist()]
    return ids


def _check_export(fs, root: str, fmt: str, ok_rows: int) -> None:
    """Read an export back with the readers a user would use, and decode every image."""
    files = _files(fs, root)
    if fmt == "parquet":
        rows = 0
        for name in files:
            with fs.open_input_file(f"{root}/{name}") as f:
                t = pq.read_table(f)
            rows += t.num_rows
            for img in t.column("image").to_pylist():
                Image.open(io.BytesIO(img["bytes"])).load()
        assert rows == ok_rows
    elif fmt == "webdataset":
        images = 0
        for name in files:
            with tarfile.open(fileobj=io.BytesIO(_read(fs, f"{root}/{name}"))) as tf:
                for m in tf.getmembers():
                    if m.name.endswith((".png", ".jpg", ".webp")) and "_map" not in m.name:
                        Image.open(io.BytesIO(tf.extractfile(m).read())).load()
                        images += 1
        assert images == ok_rows
    else:
        lines = _read(fs, f"{root}/metadata.jsonl").decode().splitlines()
        assert len(lines) == ok_rows
        for line in lines:
            Image.open(io.BytesIO(_read(fs, f"{root}/{json.loads(line)['file_name']}"))).load()


@pytest.mark.parametrize("store", ["local", "s3"])
@pytest.mark.parametrize("name,build", CORPORA, ids=[n for n, _ in CORPORA])
def test_format_matrix(name, build, store, tmp_path, request):
    assert build is not None, f"no corpus builder for format {name!r}"
    fs, uri, base = _store(store, request, tmp_path)
    local = tmp_path / "corpus"
    rel = build(str(local))
    if store == "s3":
        _upload(fs, str(local), f"{base}/corpus")
    inp = f"{uri}/corpus/{rel}"

    # 1. score -> audit
    audit = run_job(_cfg(inp, f"{uri}/audit", mode="score", save_maps=True))
    assert audit.exit_code == 3 and audit.rows == N and audit.status == {"ok": N - 1, "error": 1}  # 1 of 8 > 10%
    # 2. run --scores --refine-worst: nothing scored again, at most the budget refined
    out = f"{uri}/out"
    run = run_job(_cfg(inp, out, scores=f"{uri}/audit", refine_worst=0.25, save_maps=True, max_error_rate=0.5))
    assert run.exit_code == 0 and run.rows == N and run.status.get("ok") == N - 1
    assert sorted(_ids(out)) == sorted(k for k, _, _ in _items())
    assert not [f for f in _files(fs, f"{base}/out") if f.endswith(".parquet") and "__grefine__" in f]
    man = json.loads(_read(fs, f"{base}/out/__grefine__/manifest.json"))
    assert {e["format"] for e in man["inputs"]} == {name if name in REGISTRY else "parquet"}
    # 3. export in every format, read back
    for fmt in EXPORT_FORMATS:
        s = export(out, f"{uri}/export-{fmt}", fmt=fmt, quiet=True)
        assert (s.rows_written, s.errors_left_out, s.missing_left_out) == (N - 1, 1, 0), s.lines()
        _check_export(fs, f"{base}/export-{fmt}", fmt, N - 1)
    # 4. the report shows every original
    write_report(out)
    html = _read(fs, f"{base}/out/__grefine__/report.html").decode()
    assert "original not available" not in html and "<img" in html
    if name == "webdataset":  # each row's place in OUT is the format's: a tar's image is a sample, not a row
        assert "sample item0" in html and "the same row of the input shard" not in html
    # 5. killed mid-unit (the process dies, leaving a partial temporary), resumed: every row exactly once
    killed = f"{uri}/killed"
    cfg = _cfg(inp, killed, mode="score", unit_rows=4, max_error_rate=0.5,
               batch_hook=DieOnce(str(tmp_path / "died"), at_batch=1))
    child = multiprocessing.get_context("fork").Process(target=run_job, args=(cfg,))
    child.start()
    child.join(120)
    assert child.exitcode == 17 and (tmp_path / "died").exists()
    again = run_job(_cfg(inp, killed, mode="score", unit_rows=4, max_error_rate=0.5))
    assert again.exit_code == 0 and again.rows == N
    ids = _ids(killed)
    assert sorted(ids) == sorted(k for k, _, _ in _items()), "every row exactly once after the resume"
