"""Damaged and concatenated WebDataset tars (issue 15 items 4 and 6).

A corrupt header in the middle of a tar: reading resumes at the next valid header, as GNU tar does,
and the samples beside the skipped bytes are error rows naming them (never a silent loss). Tars
joined with ``cat`` are read whole (GNU tar --ignore-zeros). A key seen twice in a tar is decided over
the whole tar at discovery, so the unit size never changes a row, and the later sample is an error
row left out of the output tar. Discovery and the reader agree on the samples, locally and over a
streamed (object-store-like) filesystem.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from grefine_curate.pipelines import columns as C
from grefine_curate.pipelines.job import JobConfig, run_job
from grefine_curate.pipelines.tar_shards import iter_samples, sample_offsets, tar_index
from job_corpus import PROMPTS, FakeEngine, jpeg

KEYS = [f"k{i}" for i in range(6)]


def _tar_bytes(keys: list[str], seed: int = 0) -> bytes:
    """One sample per key: KEY.jpg then KEY.txt."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i, k in enumerate(keys):
            for name, data in ((f"{k}.jpg", jpeg(seed + i)), (f"{k}.txt", PROMPTS[i % len(PROMPTS)].encode())):
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime = len(data), 1_700_000_000
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _header_offset(data: bytes, name: str) -> int:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return next(m.offset for m in tf.getmembers() if m.name == name)


def _corrupt(data: bytes, name: str) -> tuple[bytes, int]:
    """The tar with one byte of ``name``'s header changed (its mtime field): a bad checksum."""
    at = _header_offset(data, name)
    b = bytearray(data)
    b[at + 140] ^= 0x07
    return bytes(b), at


def _cfg(inp, out, **kw) -> JobConfig:
    kw.setdefault("mode", "refine")
    return JobConfig(inputs=[str(inp)], out=str(out), preset="tiny", executor="local", batch_size=2, quiet=True,
                     engine_factory=lambda spec: FakeEngine(), write_report=False, **kw)


def _members(path) -> list[str]:
    with tarfile.open(path) as tf:
        return [m.name for m in tf.getmembers()]


def _gnu_tar_list(path, *flags: str) -> tuple[int, list[str]]:
    r = subprocess.run(["tar", *flags, "-tf", str(path)], capture_output=True, text=True)
    return r.returncode, r.stdout.split()


def _streamed(tmp_path) -> pafs.FileSystem:
    """Not a LocalFileSystem: discovery takes the sequential (object-store) path over it."""
    return pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())


# ---- a corrupt header in the middle -------------------------------------------------------------

def test_a_corrupt_header_is_skipped_to_the_next_valid_one_and_named(tmp_path):
    intact = _tar_bytes(KEYS)
    data, at = _corrupt(intact, "k2.txt")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "c.tar").write_bytes(data)
    if shutil.which("tar"):  # what GNU tar makes of it: every sample listed (k2 without its .txt), exit 2
        rc, names = _gnu_tar_list(tmp_path / "in" / "c.tar")
        assert rc == 2 and sorted({n.split(".")[0] for n in names}) == KEYS

    fs = pafs.LocalFileSystem()
    idx = tar_index(fs, str(tmp_path / "in" / "c.tar"))
    assert len(idx.offsets) == 6  # discovery sees the samples after the damage
    assert idx.offsets == tar_index(_streamed(tmp_path), "in/c.tar").offsets  # object-store path: the same
    assert [i for i, _ in idx.damage] == [2, 3]  # the lost member may belong to either neighbour
    keys = [s.key for s in iter_samples(fs, str(tmp_path / "in" / "c.tar"))]
    assert keys == KEYS  # the reader finds the same samples

    s = run_job(_cfg(tmp_path / "in", tmp_path / "out", max_error_rate=1.0))
    side = pq.read_table(tmp_path / "out" / "c.parquet").to_pylist()
    assert [r[C.KEY] for r in side] == KEYS, s.lines()
    assert [r[C.STATUS] for r in side] == ["ok", "ok", "error", "error", "ok", "ok"]
    size = _header_offset(intact, "k3.jpg") - at  # k2.txt's header and data
    for r in side[2:4]:
        assert f"{size} bytes skipped at byte {at}" in r[C.ERROR] and "bad checksum" in r[C.ERROR], r[C.ERROR]
    names = _members(tmp_path / "out" / "c.tar")
    assert "k5.jpg" in names and "k2.jpg" in names and "k2.txt" not in names  # kept samples; the lost member stays lost
    # the default error budget (10%) turns the damage into a failing exit code
    strict = run_job(_cfg(tmp_path / "in", tmp_path / "strict"))
    assert strict.exit_code == 3, strict.lines()


def test_damage_gives_the_same_rows_whatever_the_unit_size(tmp_path):
    # k4's first header is lost: with 2-row units the gap lies between units [2, 4) and [4, 6), and the
    # unit starting at k4 (its .txt) never sees it: discovery tells it
    data, _ = _corrupt(_tar_bytes(KEYS), "k4.jpg")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "c.tar").write_bytes(data)
    whole = run_job(_cfg(tmp_path / "in", tmp_path / "whole", max_error_rate=1.0))
    split = run_job(_cfg(tmp_path / "in", tmp_path / "split", max_error_rate=1.0, unit_rows=2))
    assert (whole.units_run, split.units_run) == (1, 3), split.lines()
    a, b = (pq.read_table(tmp_path / d / "c.parquet").to_pylist() for d in ("whole", "split"))
    assert [r[C.KEY] for r in a] == KEYS and b == a  # k4 keeps its .txt: the sample is still there
    assert [r[C.STATUS] for r in a] == ["ok", "ok", "ok", "error", "error", "ok"]
    assert "skipped at byte" in a[4][C.ERROR]  # the damage is named first (not "no image member"): it is the cause
    assert _members(tmp_path / "split" / "c.tar") == _members(tmp_path / "whole" / "c.tar")


def test_damage_in_the_last_member_runs_to_the_end_and_is_named(tmp_path):
    data, at = _corrupt(_tar_bytes(KEYS[:3]), "k2.txt")
    (tmp_path / "c.tar").write_bytes(data)
    fs = pafs.LocalFileSystem()
    samples = list(iter_samples(fs, str(tmp_path / "c.tar")))
    assert [s.key for s in samples] == KEYS[:3]
    assert samples[2].error is not None and f"skipped at byte {at}" in samples[2].error
    assert [i for i, _ in tar_index(fs, str(tmp_path / "c.tar")).damage] == [2]


# ---- concatenated tars ---------------------------------------------------------------------------

def test_concatenated_tars_are_read_whole(tmp_path):
    a, b = _tar_bytes(KEYS[:3]), _tar_bytes(KEYS[3:], seed=3)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "c.tar").write_bytes(a + b)  # cat a.tar b.tar > c.tar
    if shutil.which("tar"):
        assert _gnu_tar_list(tmp_path / "in" / "c.tar", "-i")[1] == [f"{k}.{e}" for k in KEYS for e in ("jpg", "txt")]
    fs = pafs.LocalFileSystem()
    idx = tar_index(fs, str(tmp_path / "in" / "c.tar"))
    assert len(idx.offsets) == 6 and idx.damage == () and idx.duplicates == ()
    assert idx.offsets[3] == len(a)  # the second tar's first header
    assert sample_offsets(_streamed(tmp_path), "in/c.tar") == list(idx.offsets)
    tail = iter_samples(_streamed(tmp_path), "in/c.tar", start=3, offset=idx.offsets[3], index=idx)
    assert [(s.key, s.index, s.error) for s in tail] == [(k, 3 + i, None) for i, k in enumerate(KEYS[3:])]
    for unit_rows, out in ((1000, "whole"), (2, "split")):
        s = run_job(_cfg(tmp_path / "in", tmp_path / out, unit_rows=unit_rows))
        assert s.exit_code == 0 and s.rows == 6, s.lines()
        side = pq.read_table(tmp_path / out / "c.parquet")
        assert side.column(C.KEY).to_pylist() == KEYS and side.column(C.STATUS).to_pylist() == ["ok"] * 6
    assert _members(tmp_path / "split" / "c.tar") == _members(tmp_path / "whole" / "c.tar")
    assert [n for n in _members(tmp_path / "whole" / "c.tar") if n.endswith(".jpg")] == [f"{k}.jpg" for k in KEYS]


# ---- duplicate keys ------------------------------------------------------------------------------

DUP_KEYS = ["k0", "k1", "k2", "k3", "k0", "k5"]


@pytest.mark.parametrize("mode", ["refine", "score"])
def test_a_duplicate_key_is_an_error_row_whatever_the_unit_size(tmp_path, mode):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "d.tar").write_bytes(_tar_bytes(DUP_KEYS))
    assert tar_index(pafs.LocalFileSystem(), str(tmp_path / "in" / "d.tar")).duplicates == ((4, 0),)
    sides = {}
    for unit_rows, out in ((1000, "whole"), (2, "split")):
        s = run_job(_cfg(tmp_path / "in", tmp_path / out, unit_rows=unit_rows, mode=mode, max_error_rate=1.0))
        assert s.exit_code == 0, s.lines()
        sides[out] = pq.read_table(tmp_path / out / "d.parquet").to_pylist()
        side = sides[out]
        assert [r[C.KEY] for r in side] == DUP_KEYS
        assert [r[C.STATUS] for r in side] == ["ok"] * 4 + ["error", "ok"], (out, side)
        assert side[4][C.ERROR].startswith("k0.jpg: duplicate key 'k0' (sample 0 has it too)")
        if mode == "refine":
            names = _members(tmp_path / out / "d.tar")
            assert names.count("k0.jpg") == 1 and names.count("k0.txt") == 1 and names.count("k0.json") == 1
            assert names == [n for k in ("k0", "k1", "k2", "k3", "k5") for n in (f"{k}.jpg", f"{k}.txt", f"{k}.json")]
    assert sides["split"] == sides["whole"]


@pytest.mark.parametrize("mode", ["refine", "score"])
def test_a_duplicate_keys_row_shows_its_own_sample_not_the_first(tmp_path, mode):
    """The report and export read a row's original from the input tar by position (row i is sample i,
    as the job read it), not by key: the repeated k0 (sample 4) shows sample 4's image."""
    import pyarrow as pa

    from grefine_curate.pipelines.formats import get_format
    from grefine_curate.pipelines.formats.base import OutputView

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "d.tar").write_bytes(_tar_bytes(DUP_KEYS))
    s = run_job(_cfg(tmp_path / "in", tmp_path / "out", mode=mode, max_error_rate=1.0))
    assert s.exit_code == 0, s.lines()
    view = OutputView(rel="d.tar", path=str(tmp_path / "out" / "d.parquet"), input=str(tmp_path / "in" / "d.tar"),
                      format="webdataset", out_fs=pafs.LocalFileSystem(), out_root=str(tmp_path / "out"), mode=mode)
    got = get_format("webdataset").images(view, pa.table({C.KEY: DUP_KEYS}), list(range(6)), final=False)
    assert [data for data, _ in got] == [jpeg(i) for i in range(6)]
    assert got[4][1] == "k0.jpg"
    assert get_format("webdataset").images(view, pa.table({C.KEY: ["k5", "k0"]}), [5, 4], final=False)[1][0] == jpeg(4)


def test_a_bad_header_after_a_pax_header_is_skipped_too(tmp_path):
    """Long names get a pax extended header first; a corrupt header right after one must not end the
    read (tarfile alone stops there: 'missing or bad subsequent header')."""
    long = "d/" + "x" * 120
    keys = [f"{long}{i}" for i in range(4)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i, k in enumerate(keys):
            for name, data in ((f"{k}.jpg", jpeg(i)), (f"{k}.txt", b"a prompt")):
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    intact = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(intact)) as tf:
        m = next(m for m in tf.getmembers() if m.name == f"{keys[1]}.txt")
    pax_at = m.offset  # its pax header (header block + records)
    assert m.offset_data - 512 > pax_at + 512, "no pax header: the case is not built"
    b = bytearray(intact)
    b[m.offset_data - 512 + 140] ^= 0x07  # the ustar header after the pax header
    (tmp_path / "p.tar").write_bytes(bytes(b))
    fs = pafs.LocalFileSystem()
    idx = tar_index(fs, str(tmp_path / "p.tar"))
    assert len(idx.offsets) == 4 and [i for i, _ in idx.damage] == [1, 2], idx
    assert f"skipped at byte {pax_at}" in idx.damage[0][1]
    samples = list(iter_samples(fs, str(tmp_path / "p.tar"), index=idx))
    assert [s.key for s in samples] == keys and [s.error is None for s in samples] == [True, False, False, True]
    assert tar_index(_streamed(tmp_path), "p.tar") == idx
