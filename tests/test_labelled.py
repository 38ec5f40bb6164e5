"""The shared reader of labelled data (images + MOS columns) behind `eval` and `train-pq`."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from grefine_curate.curate.errors import InputError
from grefine_curate.pipelines.labelled import float_or_none, iter_labelled, load_training_samples


def _png(level: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (level, level, level)).save(buf, "PNG")
    return buf.getvalue()


def _write(path, rows, image_struct=False, image_name="image"):
    images = [_png(10 * r) for r in rows]
    cols = {
        image_name: [{"bytes": b, "path": None} for b in images] if image_struct else images,
        "prompt": [f"p{r}" for r in rows],
        "mos": [float(r) for r in rows],
    }
    pq.write_table(pa.table(cols), path)


def test_directory_of_shards_in_order_with_values(tmp_path):
    d = tmp_path / "data"
    (d / "b").mkdir(parents=True)
    _write(d / "a.parquet", [0, 1, 2])
    _write(d / "b" / "c.parquet", [3, 4])
    items = iter_labelled(str(d), ["mos"], batch_rows=2)
    assert len(items) == 5 and [s.rel for s in items.shards] == ["a.parquet", "b/c.parquet"]
    got = list(items)
    assert [it.item_id for it in got] == ["a.parquet#0", "a.parquet#1", "a.parquet#2", "b/c.parquet#0", "b/c.parquet#1"]
    assert [it.values["mos"] for it in got] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [it.prompt for it in got] == ["p0", "p1", "p2", "p3", "p4"]
    assert got[4].image == _png(40) and all(it.error is None for it in got)
    assert [it.item_id for it in items] == [it.item_id for it in got]  # iterable again


def test_glob_and_several_inputs(tmp_path):
    for k in range(3):
        _write(tmp_path / f"part-{k}.parquet", [k])
    (tmp_path / "notes.txt").write_text("not data")
    got = list(iter_labelled(str(tmp_path / "part-[02].parquet"), ["mos"]))
    assert [it.values["mos"] for it in got] == [0.0, 2.0]
    got = list(iter_labelled([str(tmp_path / "part-1.parquet"), str(tmp_path / "part-0.parquet")], ("mos",)))
    assert [it.item_id for it in got] == ["part-1.parquet#0", "part-0.parquet#0"]


def test_image_folder_with_metadata_jsonl(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    for rel, level in [("a.png", 10), ("sub/b.png", 20), ("c.png", 30), ("d.png", 40)]:
        (root / rel).write_bytes(_png(level))
    rows = [{"file_name": "a.png", "text": "a cat", "mos": 1.5, "align": 2},
            {"file_name": "sub/b.png", "text": "a dog", "mos": "2.5", "align": None},
            {"file_name": "c.png", "text": "x", "mos": "n/a", "align": 1}]  # d.png: no row at all
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    items = iter_labelled(str(root), ["mos", "align"])
    got = {it.item_id: it for it in items}
    assert sorted(got) == ["a.png", "c.png", "d.png", "sub/b.png"] and len(items) == 4
    assert got["a.png"].values == {"mos": 1.5, "align": 2.0} and got["a.png"].prompt == "a cat"
    assert got["sub/b.png"].values == {"mos": 2.5, "align": None} and got["sub/b.png"].image == _png(20)
    assert got["c.png"].values["mos"] is None  # not a number: missing, for the caller to report
    assert got["d.png"].values == {"mos": None, "align": None}


def test_hf_struct_by_bytes_and_by_path(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "1.png").write_bytes(_png(50))
    cells = [{"bytes": _png(10), "path": None}, {"bytes": None, "path": "img/1.png"},
             {"bytes": None, "path": "img/gone.png"}, {"bytes": None, "path": None}, None]
    pq.write_table(pa.table({"picture": cells, "q": [1, 2, 3, 4, 5]}), tmp_path / "hf.parquet")
    got = list(iter_labelled(str(tmp_path / "hf.parquet"), ["q"], image_column="picture"))
    assert [it.image for it in got[:2]] == [_png(10), _png(50)] and got[0].error is None and got[1].error is None
    assert got[2].image is None and "img/gone.png" in got[2].error and "cannot be read" in got[2].error
    assert got[3].image is None and "neither bytes nor path" in got[3].error
    assert got[4].image is None and got[4].error is None  # a null cell: the decoder says "image is null"
    assert [it.values["q"] for it in got] == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_missing_column_is_an_error_before_reading(tmp_path):
    _write(tmp_path / "a.parquet", [0, 1])
    with pytest.raises(InputError, match=r"no MOS column 'MOS'; columns found: image \(binary\), prompt \(string\), mos \(double\)"):
        iter_labelled(str(tmp_path / "a.parquet"), ["MOS"])
    pq.write_table(pa.table({"image": [_png(0)], "mos": ["high"]}), tmp_path / "s.parquet")
    with pytest.raises(InputError, match="MOS column 'mos' has type string; expected numbers"):
        iter_labelled(str(tmp_path / "s.parquet"), ["mos"])
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.png").write_bytes(_png(0))
    (root / "metadata.csv").write_text("file_name,quality\na.png,3\n")
    with pytest.raises(InputError, match=r"no MOS field 'mos' in metadata.jsonl / metadata.csv; fields found: file_name, quality"):
        iter_labelled(str(root), ["mos"])  # raised on the call, before any item is read
    with pytest.raises(InputError, match="no such file or directory"):
        iter_labelled(str(tmp_path / "nothing"), ["mos"])


def test_load_training_samples_takes_the_factor_mapping(tmp_path):
    _write(tmp_path / "a.parquet", [1, 2], image_name="img")
    samples = load_training_samples(str(tmp_path / "a.parquet"), {"overall": "mos", "technical": "mos"},
                                    image_column="img")
    got = list(samples)
    assert len(samples) == 2 and [(s.item_id, s.values) for s in got] == [("a.parquet#0", {"mos": 1.0}),
                                                                          ("a.parquet#1", {"mos": 2.0})]
    with pytest.raises(InputError, match="no MOS column 'tech'"):
        load_training_samples(str(tmp_path / "a.parquet"), {"overall": "mos", "technical": "tech"}, "img")


@pytest.mark.parametrize("value, expected", [(None, None), (True, None), ("", None), ("x", None), ("2.5", 2.5),
                                             (float("nan"), None), (float("inf"), None), (3, 3.0)])
def test_float_or_none(value, expected):
    assert float_or_none(value) == expected
