"""WebDataset tar shards: reading samples by key, the mirrored tar and its Parquet sidecar, score mode,
bad members as error rows, a non-tar refused, and the sidecar as the commit record."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from grefine_curate.curate.errors import InputError
from grefine_curate.pipelines import columns as C
from grefine_curate.pipelines.job import JobConfig, exit_code_for, run_job
from grefine_curate.pipelines.sources import discover, resolve_fs
from grefine_curate.pipelines.tar_shards import count_samples, iter_samples, split_member
from job_corpus import PROMPTS, encode, jpeg, rgb

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))


def good_members(n: int = 5, start: int = 0) -> list[tuple[str, bytes]]:
    """n samples: jpg+txt, png+json(caption), webp+json(prompt)+cls, cycling."""
    out = []
    for i in range(start, start + n):
        key = f"{i:09d}"
        kind = i % 3
        if kind == 0:
            out += [(f"{key}.jpg", jpeg(i)), (f"{key}.txt", PROMPTS[i % len(PROMPTS)].encode())]
        elif kind == 1:
            out += [(f"{key}.json", json.dumps({"caption": PROMPTS[i % len(PROMPTS)], "width": 48}).encode()),
                    (f"{key}.png", encode(rgb(i)))]
        else:
            out += [(f"{key}.webp", encode(rgb(i), "WEBP")), (f"{key}.cls", b"3"),
                    (f"{key}.json", json.dumps({"prompt": PROMPTS[i % len(PROMPTS)], "uid": key}).encode())]
    return out


def _cfg(inp, out, **kw) -> JobConfig:
    kw.setdefault("mode", "refine")
    return JobConfig(inputs=[str(inp)], out=str(out), preset="tiny", executor="local", batch_size=3, quiet=True, **kw)


def _read_tar(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def test_split_member_follows_webdataset_keys():
    assert split_member("a/b/000012.seg.png") == ("a/b/000012", "seg.png")
    assert split_member("000012.JPG") == ("000012", "jpg")


def test_refine_mirrors_the_tar_and_writes_a_sidecar(tmp_path):
    members = good_members(6)
    write_tar(tmp_path / "in" / "part" / "00000.tar", members)
    s = run_job(_cfg(tmp_path / "in", tmp_path / "out", save_maps=True))
    assert s.exit_code == 0 and s.rows == 6, s.lines()
    assert (tmp_path / "out" / "__grefine__" / "report.html").exists(), s.notes  # the report reads the sidecar's scores
    out = _read_tar(tmp_path / "out" / "part" / "00000.tar")
    side = pq.read_table(tmp_path / "out" / "part" / "00000.parquet")
    assert side.column(C.KEY).to_pylist() == [f"{i:09d}" for i in range(6)]  # one row per sample, in order
    assert side.column(C.STATUS).to_pylist() == ["ok"] * 6
    assert side.column(C.PROMPT).to_pylist() == [PROMPTS[i % len(PROMPTS)] for i in range(6)]
    rows = {r[C.KEY]: r for r in side.to_pylist()}
    # every input member, in order, plus KEY.json where the sample had none (after its members)
    want_names = []
    for name, _ in members:
        want_names.append(name)
        if name.endswith(".txt"):
            want_names.append(name[:-4] + ".json")
    assert [n for n, _ in out] == want_names
    src = dict(members)
    refined = 0
    for name, data in out:
        key, ext = split_member(name)
        row = rows[key]
        if ext in ("jpg", "png", "webp"):
            if row[C.ROUTE] in ("skip", "reverted"):
                assert data == src[name]
            else:
                refined += 1
                img = Image.open(io.BytesIO(data))
                assert img.format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext] and img.size == (48, 40)
        elif ext == "json":
            meta = json.loads(data)
            base = json.loads(src[name]) if name in src else {}
            assert {k: meta[k] for k in base} == base  # input fields kept
            assert meta[C.STATUS] == "ok" and meta[C.ROUTE] == row[C.ROUTE]
            assert meta[C.PQ_SCORE] == pytest.approx(row[C.PQ_SCORE]) and C.PQ_MAP not in meta
        else:
            assert data == src[name]  # .txt, .cls unchanged
    assert refined >= 1, "no sample was refined: the image replacement went unchecked"
    assert side.column(C.PQ_MAP).null_count == 0
    marker = json.loads((tmp_path / "out" / "__grefine__" / "shards" / "part" / "00000.tar.json").read_text())
    assert marker["companions"] == {"part/00000.tar": os.path.getsize(tmp_path / "out" / "part" / "00000.tar")}


def test_score_mode_writes_only_the_sidecar_and_input_sidecars_are_not_input(tmp_path):
    write_tar(tmp_path / "in" / "00000.tar", good_members(4))
    write_tar(tmp_path / "in" / "00001.tar", good_members(3, start=4))
    # img2dataset writes a Parquet of metadata beside each tar: it is not a data shard
    pq.write_table(pa.table({"key": ["000000000"], "status": ["success"]}), tmp_path / "in" / "00000.parquet")
    s = run_job(_cfg(tmp_path / "in", tmp_path / "out", mode="score"))
    assert s.exit_code == 0 and s.rows == 7 and s.shards_total == 2, s.lines()
    assert not (tmp_path / "out" / "00000.tar").exists()
    side = pq.read_table(tmp_path / "out" / "00001.parquet")
    assert side.column(C.KEY).to_pylist() == [f"{i:09d}" for i in range(4, 7)]
    assert side.column(C.STATUS).to_pylist() == ["ok"] * 3 and side.column(C.PQ_SCORE).null_count == 0


def bad_members() -> list[tuple[str, bytes]]:
    good = good_members(2)
    return good + [
        ("000000010.txt", b"a prompt without its image"),  # a sample without an image
        ("000000011.jpg", jpeg(11)), ("000000011.json", b"{not json"),  # bad JSON member
        ("../evil.jpg", jpeg(12)), ("../evil.txt", b"escape"),  # a key that would leave its folder
        ("000000000.jpg", jpeg(13)),  # a duplicate key (not consecutive)
        ("000000014.jpg", jpeg(14)), ("000000014.jpg", jpeg(15)),  # a duplicate member
        ("000000016.png", encode(rgb(16))), ("000000016.txt", b"fine"),
        ("000000017.jpg", b"\xff\xd8\xff\xe0" + os.urandom(64)),  # bytes that are no image
    ]


def test_bad_members_are_error_rows_naming_the_member(tmp_path):
    members = bad_members()
    write_tar(tmp_path / "in" / "bad.tar", members)
    # a second tar, cut inside its last member: a truncated member
    write_tar(tmp_path / "in2" / "t.tar", members + [("000000018.jpg", jpeg(18) * 4)])
    t = (tmp_path / "in2" / "t.tar").read_bytes()
    cut = t.rfind(b"000000018.jpg")
    (tmp_path / "in2" / "t.tar").write_bytes(t[: cut + 512 + 300])
    s = run_job(_cfg(tmp_path / "in", tmp_path / "out", max_error_rate=1.0))
    assert s.exit_code == 0, s.lines()
    side = pq.read_table(tmp_path / "out" / "bad.parquet").to_pylist()
    by_key = {}
    for r in side:
        by_key.setdefault(r[C.KEY], []).append(r)
    assert [r[C.KEY] for r in side] == ["000000000", "000000001", "000000010", "000000011", "../evil", "000000000",
                                        "000000014", "000000016", "000000017"]
    errs = {r[C.KEY] + f"@{i}": r[C.ERROR] for i, r in enumerate(side) if r[C.STATUS] == "error"}
    assert "000000010: no image member" in errs["000000010@2"] and "000000010.txt" in errs["000000010@2"]
    assert "000000011.json: not valid JSON" in errs["000000011@3"]
    assert errs["../evil@4"].startswith("../evil.jpg: member name leaves its folder")
    assert errs["000000000@5"].startswith("000000000.jpg: duplicate key")
    assert errs["000000014@6"].startswith("000000014.jpg: duplicate member")
    assert errs["000000017@8"].startswith("000000017")
    assert [r[C.STATUS] for r in side].count("ok") == 3
    names = [n for n, _ in _read_tar(tmp_path / "out" / "bad.tar")]
    assert not [n for n in names if ".." in n]  # nothing that could leave its folder when extracted
    assert "000000010.txt" in names and "000000016.png" in names  # bad samples are kept, not dropped
    for dirpath, _, files in os.walk(tmp_path):
        assert "evil.jpg" not in files and "evil.json" not in files
    # a truncated member: every sample before it is fine, the cut one is an error row naming it
    s2 = run_job(_cfg(tmp_path / "in2", tmp_path / "out2", max_error_rate=1.0, mode="score"))
    side2 = pq.read_table(tmp_path / "out2" / "t.parquet").to_pylist()
    assert s2.exit_code == 0 and len(side2) == len(side) + 1, s2.lines()
    assert side2[-1][C.STATUS] == "error" and side2[-1][C.ERROR].startswith("000000018.jpg: truncated member")


def test_a_tar_that_is_not_a_tar_is_refused_before_any_work(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.tar").write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(InputError) as e:
        run_job(_cfg(tmp_path / "in", tmp_path / "out"))
    assert "x.tar: not a readable tar file" in str(e.value) and exit_code_for(e.value) == 2
    assert not (tmp_path / "out").exists()


def test_the_sidecar_is_the_commit_record_of_its_tar(tmp_path):
    write_tar(tmp_path / "in" / "00000.tar", good_members(3))
    cfg = _cfg(tmp_path / "in", tmp_path / "out")
    assert run_job(cfg).exit_code == 0
    marker = tmp_path / "out" / "__grefine__" / "shards" / "00000.tar.json"
    tar = tmp_path / "out" / "00000.tar"
    mtime = tar.stat().st_mtime_ns
    marker.unlink()  # killed between the renames and the marker
    again = run_job(cfg)
    assert again.adopted == 1 and again.shards_run == 0 and tar.stat().st_mtime_ns == mtime
    marker.unlink()
    tar.write_bytes(tar.read_bytes()[:-1024])  # the tar does not match its record: recomputed
    third = run_job(cfg)
    assert third.adopted == 0 and third.shards_run == 1
    assert len(_read_tar(tar)) == 8  # 7 members + one added KEY.json


def test_samples_stream_in_order_with_a_stop(tmp_path):
    write_tar(tmp_path / "a.tar", good_members(5))
    fs, path = resolve_fs(str(tmp_path / "a.tar"))
    assert count_samples(fs, path) == 5
    keys = [s.key for s in iter_samples(fs, path, stop=3)]
    assert keys == ["000000000", "000000001", "000000002"]
    assert discover([str(tmp_path / "a.tar")])[0].num_rows == 5


def test_a_tar_in_units_gives_the_same_tar_and_sidecar_as_one_unit(tmp_path):
    write_tar(tmp_path / "in" / "00000.tar", good_members(7))
    whole = run_job(_cfg(tmp_path / "in", tmp_path / "whole", unit_rows=1000))
    split = run_job(_cfg(tmp_path / "in", tmp_path / "split", unit_rows=3))  # units on batch boundaries (3)
    assert whole.exit_code == 0 and split.exit_code == 0, split.lines()
    assert (whole.units_run, split.units_run) == (1, 3)
    assert _read_tar(tmp_path / "split" / "00000.tar") == _read_tar(tmp_path / "whole" / "00000.tar")
    a, b = (pq.read_table(tmp_path / d / "00000.parquet") for d in ("whole", "split"))
    assert b.to_pylist() == a.to_pylist()
    marker = json.loads((tmp_path / "split" / "__grefine__" / "shards" / "00000.tar.json").read_text())
    assert [(u["start"], u["stop"]) for u in marker["units"]] == [(0, 3), (3, 6), (6, 7)]
    assert marker["companions"] == {"00000.tar": os.path.getsize(tmp_path / "split" / "00000.tar")}
    assert not (tmp_path / "split" / "__grefine__" / "units").exists() or not any(
        (tmp_path / "split" / "__grefine__" / "units").rglob("*.*"))
    again = run_job(_cfg(tmp_path / "in", tmp_path / "split", unit_rows=3))
    assert again.shards_skipped == 1 and again.units_run == 0
