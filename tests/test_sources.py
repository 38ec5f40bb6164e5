"""Sources of the curation job: discovery, column checks before any work, folders, safe names."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grefine_curate.curate.errors import InputError
from grefine_curate.pipelines.sources import ColumnSpec, _glob_regex, discover, safe_relpath
from job_corpus import jpeg, write_dataset, write_folder, write_shard


def test_directory_is_searched_recursively_in_path_order(tmp_path):
    write_dataset(str(tmp_path / "data"), shards=3, rows=4)
    (tmp_path / "data" / ".hidden.parquet").write_bytes(b"junk")
    (tmp_path / "data" / "_grefine").mkdir()
    (tmp_path / "data" / "_grefine" / "x.parquet").write_bytes(b"junk")
    (tmp_path / "data" / "part-a" / ".shard-000.parquet.grefine-tmp-abcd1234").write_bytes(b"junk")
    shards = discover([str(tmp_path / "data")])
    assert [s.rel for s in shards] == ["part-a/shard-000.parquet", "part-a/shard-002.parquet",
                                       "part-b/shard-001.parquet"]
    assert all(s.num_rows == 4 and s.format == "parquet" for s in shards)
    assert shards[0].image_column == "image" and shards[0].prompt_column == "prompt"
    assert shards[0].id_column is None and not shards[0].image_is_struct


def test_file_and_glob_inputs(tmp_path):
    write_dataset(str(tmp_path / "data"), shards=3, rows=2)
    one = discover([str(tmp_path / "data" / "part-b" / "shard-001.parquet")])
    assert [s.rel for s in one] == ["shard-001.parquet"]
    globbed = discover([str(tmp_path / "data" / "*" / "shard-00[02].parquet")])
    assert [s.rel for s in globbed] == ["part-a/shard-000.parquet", "part-a/shard-002.parquet"]
    deep = discover([str(tmp_path / "**" / "*.parquet")])
    assert len(deep) == 3
    assert _glob_regex("/a/*.parquet").match("/a/x.parquet")
    assert not _glob_regex("/a/*.parquet").match("/a/b/x.parquet")
    assert _glob_regex("/a/**/x.parquet").match("/a/x.parquet")


def test_out_inside_input_is_not_read_back(tmp_path):
    write_dataset(str(tmp_path / "data"), shards=1, rows=2)
    write_shard(str(tmp_path / "data" / "refined" / "part-a" / "shard-000.parquet"), 2)
    shards = discover([str(tmp_path / "data")], out=str(tmp_path / "data" / "refined"))
    assert [s.rel for s in shards] == ["part-a/shard-000.parquet"]


def test_missing_column_names_the_columns_found(tmp_path):
    write_shard(str(tmp_path / "d" / "a.parquet"), 2)
    with pytest.raises(InputError) as e:
        discover([str(tmp_path / "d")], ColumnSpec(prompt="caption"))
    msg = str(e.value)
    assert "caption" in msg and "image (binary)" in msg and "prompt (string)" in msg and "--prompt-column" in msg
    with pytest.raises(InputError, match="no id column 'uid'"):
        discover([str(tmp_path / "d")], ColumnSpec(id="uid"))
    pq.write_table(pa.table({"pixels": pa.array([jpeg(0)]), "text": ["x"]}), tmp_path / "e.parquet")
    with pytest.raises(InputError, match="no image column found.*pixels.*--image-column"):
        discover([str(tmp_path / "e.parquet")])
    s = discover([str(tmp_path / "e.parquet")], ColumnSpec(image="pixels"))[0]
    assert s.image_column == "pixels" and s.prompt_column == "text"  # "text" found automatically
    pq.write_table(pa.table({"image": pa.array([1, 2])}), tmp_path / "f.parquet")
    with pytest.raises(InputError, match="image column 'image' has type int64"):
        discover([str(tmp_path / "f.parquet")])


def test_hf_struct_image_column_and_unreadable_parquet(tmp_path):
    write_shard(str(tmp_path / "s.parquet"), 3, struct=True)
    s = discover([str(tmp_path / "s.parquet")])[0]
    assert s.image_is_struct and s.num_rows == 3
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="bad.parquet: not a readable Parquet file"):
        discover([str(tmp_path / "bad.parquet")])


def test_empty_or_missing_inputs_fail_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no input found"):
        discover([str(tmp_path / "empty")])
    with pytest.raises(InputError, match="no such file or directory"):
        discover([str(tmp_path / "nope")])
    with pytest.raises(InputError, match="no input given"):
        discover([])


def test_two_inputs_with_the_same_output_name_are_refused(tmp_path):
    write_shard(str(tmp_path / "a" / "x.parquet"), 1)
    write_shard(str(tmp_path / "b" / "x.parquet"), 1)
    with pytest.raises(InputError, match="same output 'x.parquet'"):
        discover([str(tmp_path / "a"), str(tmp_path / "b")])


def test_folder_with_sidecars_is_sharded_in_sorted_order(tmp_path):
    rels = write_folder(str(tmp_path / "imgs"), n=5)
    shards = discover([str(tmp_path / "imgs")], folder_shard_size=2)
    assert [s.rel for s in shards] == ["scores/imgs-00000.parquet", "scores/imgs-00001.parquet",
                                       "scores/imgs-00002.parquet"]
    items = [it for s in shards for it in s.items]
    assert [it.rel for it in items] == sorted(rels)
    assert all(it.prompt and not it.prompt.endswith("\n") for it in items)
    single = discover([str(tmp_path / "imgs" / "sub" / "img_01.jpg")])
    assert len(single) == 1 and single[0].items[0].rel == "img_01.jpg" and single[0].items[0].prompt


def test_folder_metadata_jsonl_and_csv(tmp_path):
    root = tmp_path / "hf"
    write_folder(str(root), n=3, sidecar=False)
    with open(root / "metadata.jsonl", "w") as f:
        f.write(json.dumps({"file_name": "img_00.png", "text": "a red car"}) + "\n")
        f.write(json.dumps({"file_name": "sub/img_01.jpg", "text": "a cat"}) + "\n")
    items = {it.rel: it.prompt for it in discover([str(root)])[0].items}
    assert items == {"img_00.png": "a red car", "sub/img_01.jpg": "a cat", "img_02.jpg": None}
    os.remove(root / "metadata.jsonl")
    with open(root / "sub" / "metadata.csv", "w") as f:
        f.write("file_name,caption\nimg_01.jpg,\"a dog, running\"\n")
    items = {it.rel: it.prompt for it in discover([str(root)])[0].items}
    assert items["sub/img_01.jpg"] == "a dog, running"
    with open(root / "metadata.jsonl", "w") as f:
        f.write("{not json\n")
    with pytest.raises(InputError, match="line 1 is not valid JSON"):
        discover([str(root)])


def test_safe_relpath_never_leaves_the_root():
    assert safe_relpath("../../etc/passwd") == "etc/passwd"
    assert safe_relpath("/abs/x.png") == "abs/x.png"
    assert safe_relpath("a\\..\\..\\b.png") == "a/b.png"
    assert safe_relpath("C:\\win\\x.png") == "C_/win/x.png"
    assert safe_relpath("ok/./name.jpg") == "ok/name.jpg"
    with pytest.raises(InputError):
        safe_relpath("../..")


def test_underscore_names_are_data_not_state(tmp_path):
    """Camera names like _DSC0001.jpg and folders like _sub/ are images; only _grefine/ is ours."""
    folder = tmp_path / "imgs"
    (folder / "_sub").mkdir(parents=True)
    for rel in ("_DSC0001.jpg", "y.jpg", "_sub/z.jpg"):
        (folder / rel).write_bytes(jpeg(1))
    (folder / ".thumb.jpg").write_bytes(jpeg(2))
    shards = discover([str(folder)])
    assert sorted(it.rel for s in shards for it in s.items) == ["_DSC0001.jpg", "_sub/z.jpg", "y.jpg"]


def test_folder_with_parquet_and_images_is_refused(tmp_path):
    write_dataset(str(tmp_path / "mixed"), shards=1, rows=2)
    (tmp_path / "mixed" / "photo.jpg").write_bytes(jpeg(3))
    with pytest.raises(InputError, match="both Parquet files .* and image files"):
        discover([str(tmp_path / "mixed")])


def test_nested_output_of_an_earlier_job_is_skipped(tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg(4))
    earlier = folder / "out"  # `score imgs --out imgs/out` wrote here
    (earlier / "_grefine").mkdir(parents=True)
    (earlier / "_grefine" / "manifest.json").write_text("{}")
    (earlier / "scores").mkdir()
    (earlier / "scores" / "imgs-00000.parquet").write_bytes(b"not read")
    with caplog.at_level("WARNING"):
        shards = discover([str(folder)])
    assert [it.rel for s in shards for it in s.items] == ["a.jpg"]
    assert "output of an earlier grefine-curate job" in caplog.text


def test_an_earlier_output_folder_itself_is_a_valid_input(tmp_path):
    """Chaining jobs: OUT of one run is the input of the next."""
    earlier = tmp_path / "refined"
    write_dataset(str(earlier), shards=1, rows=2)
    (earlier / "_grefine").mkdir()
    (earlier / "_grefine" / "manifest.json").write_text("{}")
    assert [s.num_rows for s in discover([str(earlier)])] == [2]


def test_metadata_rows_without_an_image_are_reported(tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg(5))
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.jpg", "text": "a cat"}) + "\n" + json.dumps({"file_name": "gone.jpg", "text": "x"}) + "\n")
    with caplog.at_level("WARNING"):
        shards = discover([str(folder)])
    assert [(it.rel, it.prompt) for s in shards for it in s.items] == [("a.jpg", "a cat")]
    assert "1 row(s) name files that are not in the folder" in caplog.text and "gone.jpg" in caplog.text


def test_fs_uri_inverts_resolve_fs(tmp_path):
    from grefine_curate.pipelines.sources import fs_uri, resolve_fs

    fs, path = resolve_fs(str(tmp_path))
    assert fs_uri(fs, path) == path  # local: a plain path

    class FakeS3:
        type_name = "s3"

    class FakeGcs:
        type_name = "gcs"

    assert fs_uri(FakeS3(), "bucket/shards/a.parquet") == "s3://bucket/shards/a.parquet"
    assert fs_uri(FakeGcs(), "bucket/a.parquet") == "gs://bucket/a.parquet"
