"""WebDataset tar shards in and out (the layout of LAION/DataComp-style sets and img2dataset outputs).

A sample is the run of consecutive members that share a *key* (the member path up to the first dot
of its file name): ``KEY.jpg|jpeg|png|webp`` is the image, ``KEY.txt`` the prompt, ``KEY.json``
metadata (its ``caption`` or ``prompt`` field is the prompt when there is no ``.txt``). Everything
is streamed with the standard ``tarfile`` module over ``pyarrow.fs`` streams (local, s3://, gs://):
a tar is never held in memory, only the samples of the batch being worked on.

Output, mirroring the input: a tar at the same relative path holding every sample's members
unchanged and in order, except the image (the refined image, encoded in its member's own format,
where the route refined it) and ``KEY.json`` (the input's fields plus the added columns of the
Parquet contract; created when the sample had none); and beside it a Parquet *sidecar* at the same
path with ``.parquet`` for ``.tar`` (``00000.tar`` -> ``00000.parquet``, as img2dataset writes), one
row per sample with a ``key`` column and the scores. Score mode writes only the sidecar. The
sidecar's footer carries the commit record, which names the tar and its size.

Work units (units.py) cut a tar into runs of samples: ``sample_offsets`` records where each sample's
first header starts, a unit starts reading there, and ``concat_tars`` joins the units' part tars.

Bad input never drops a sample: a truncated member, a sample without an image, a duplicate key, a
member name that would leave its folder (``../``, absolute) are error rows naming the member. A
``.tar`` that is not a tar at all (its first block is no valid header) is refused before any work
(exit 2).

Damage and concatenation are read the way GNU tar ``--ignore-zeros`` reads them (``TarWalk``): zero
blocks are passed over, so ``cat a.tar b.tar > c.tar`` is read whole; a block that is no valid header
(a corrupt header: bad checksum) starts a scan for the next 512-byte block whose header is valid, and
the skipped bytes are reported (``Skip``). Discovery (``tar_index``) and the reader use the same walk,
so they find the same samples. Decisions that need the whole tar are taken at discovery, where every
header is seen, and carried to every work unit: a key seen before (``duplicates``: an error row, left
out of the output tar; the first sample with the key stays) and the samples beside skipped bytes
(``damage``: error rows naming where and how many bytes were skipped; both neighbours, since the lost
member may belong to either, and whole samples may be lost between them). So the unit size never
changes a row.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from grefine_curate.curate.errors import InputError
from grefine_curate.pipelines.commit import AtomicFile

TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
PROMPT_JSON_FIELDS = ("caption", "prompt")
READ_BLOCK = 8 << 20  # bytes per read of a tar streamed from an object store


def split_member(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, WebDataset's rule: the key ends at the first dot of the file name."""
    d, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return (posixpath.join(d, stem) if d else stem), ext.lower() if dot else ""


def unsafe_name(name: str) -> bool:
    """A member name that would write outside its folder when the tar is extracted."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":")


@dataclass
class Member:
    info: tarfile.TarInfo
    data: bytes | None  # None: unreadable (see the sample's error)


@dataclass
class Sample:
    """One WebDataset sample: its key and members in tar order; ``error`` names a bad member."""

    key: str
    index: int  # position in the tar (0-based)
    members: list[Member] = field(default_factory=list)
    error: str | None = None
    duplicate_of: int | None = None  # index of the first sample with this key: never written to the output tar

    @property
    def image(self) -> Member | None:
        return next((m for m in self.members if split_member(m.info.name)[1] in TAR_IMAGE_EXTENSIONS), None)

    def member(self, ext: str) -> Member | None:
        return next((m for m in self.members if split_member(m.info.name)[1] == ext), None)


@dataclass(frozen=True)
class Skip:
    """Bytes passed over between two valid headers (or to the tar's end): they held no readable header."""

    offset: int  # byte offset in the tar of the first unreadable block
    size: int  # bytes skipped, up to the next valid header or the end
    reason: str  # why the first block was refused (tarfile's words: "bad checksum", ...)

    def describe(self) -> str:
        return (f"{self.size} bytes skipped at byte {self.offset} of the tar ({self.reason}: a corrupt header); "
                "reading resumed at the next valid header, so a member of this sample may be lost")


class _Header(tarfile.TarInfo):
    """A header that remembers, on its TarFile, where unreadable blocks began (tarfile skips them
    silently with ``ignore_zeros``; the job must say where and how much)."""

    @classmethod
    def fromtarfile(cls, tf):
        pos = tf.fileobj.tell()
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            raise  # a zero block: the end-of-archive marker, or the padding between concatenated tars
        except (tarfile.InvalidHeaderError, tarfile.SubsequentHeaderError) as e:
            if pos == 0:  # no header where the tar (or a unit, at a header found by discovery) starts
                raise tarfile.ReadError(str(e)) from None
            # the earliest block wins: a pax/GNU long-name header followed by a bad one is lost with it
            # (the nested read recorded the bad one first)
            if tf.bad is None or pos < tf.bad[0]:
                tf.bad = (pos, str(e))
            # skip on like any bad block (tarfile alone would stop the whole read at a bad subsequent header)
            raise tarfile.InvalidHeaderError(str(e)) from None


class _WalkFile(tarfile.TarFile):
    tarinfo = _Header
    bad: tuple[int, str] | None = None  # (offset, reason) of the first unreadable block since the last header


class TarWalk:
    """A tar's members in order, read like GNU tar ``--ignore-zeros``: ``next`` returns (member or None at
    the end, the Skip just before it or None). ``seekable``: seek over member data (a local file);
    otherwise read strictly sequentially (an object-store stream). ``base``: the stream's offset in
    the tar (a work unit's start), so that offsets and messages are the tar's own."""

    def __init__(self, fileobj, base: int = 0, seekable: bool = False):
        self.base = base
        self.tf = _WalkFile.open(fileobj=fileobj, mode="r:" if seekable else "r|", ignore_zeros=True)

    def next(self) -> tuple[tarfile.TarInfo | None, Skip | None]:
        ti = self.tf.next()  # raises ReadError when the tar is cut inside a member
        self.tf.members.clear()  # keep memory flat over millions of members
        skip = None
        if self.tf.bad is not None:
            pos, reason = self.tf.bad
            end = ti.offset if ti is not None else self.tf.fileobj.tell()
            skip = Skip(self.base + pos, end - pos, reason)
            self.tf.bad = None
        if ti is not None:
            ti.offset += self.base
        return ti, skip

    def read(self, ti: tarfile.TarInfo) -> bytes:
        return self.tf.extractfile(ti).read()


def _open_walk(fs: pafs.FileSystem, path: str, offset: int = 0):
    if offset:  # a work unit past the first: start at its first sample's header, then read ahead in blocks
        raw = fs.open_input_file(path)
        raw.seek(offset)
        stream = pa.BufferedInputStream(raw, READ_BLOCK)
    else:
        stream = fs.open_input_stream(path, buffer_size=READ_BLOCK)
    try:
        # sequential, one member in memory at a time (never the whole tar)
        return stream, TarWalk(stream, base=offset)
    except (tarfile.TarError, OSError, EOFError) as e:
        stream.close()
        raise InputError(f"{path}: not a readable tar file ({e}); remove it from the input or repair it") from e


@dataclass(frozen=True)
class TarIndex:
    """What discovery learns from every header of a tar (plain tuples: it travels in the Shard)."""

    offsets: tuple[int, ...] = ()  # byte offset of each sample's first header
    duplicates: tuple[tuple[int, int], ...] = ()  # (sample index, index of the first sample with its key)
    damage: tuple[tuple[int, str], ...] = ()  # (sample index, why): samples beside skipped bytes


def count_samples(fs: pafs.FileSystem, path: str) -> int:
    """Samples in a tar (see ``tar_index``)."""
    return len(tar_index(fs, path).offsets)


def sample_offsets(fs: pafs.FileSystem, path: str) -> list[int]:
    """Byte offset of each sample's first header (see ``tar_index``)."""
    return list(tar_index(fs, path).offsets)


def tar_index(fs: pafs.FileSystem, path: str) -> TarIndex:
    """The samples of a tar from its headers (metadata pass at discovery; raises InputError for a
    non-tar): where each starts (a work unit of samples [k, m) starts reading at offset k), which
    repeat an earlier key, and which lie beside skipped bytes.

    On a local disk it seeks over member data and reads only the headers (and, past a corrupt one,
    every block up to the next valid header). On an object store a seek is a new ranged request (one
    per member: latency-bound, minutes for a 10,000-sample tar), so there it reads the tar once as a
    sequential stream in large blocks instead (bandwidth-bound).
    """
    offsets: list[int] = []
    first: dict[str, int] = {}  # key -> index of its first sample
    duplicates: list[tuple[int, int]] = []
    damage: dict[int, str] = {}
    pending: Skip | None = None  # bytes skipped before the next sample's first header
    last = None
    local = isinstance(fs, pafs.LocalFileSystem)
    try:
        with (fs.open_input_file(path) if local else fs.open_input_stream(path, buffer_size=READ_BLOCK)) as f:
            walk = TarWalk(f, seekable=local)
            while True:
                try:
                    ti, skip = walk.next()
                except tarfile.ReadError:  # a truncated tail: the samples read so far count
                    break
                if skip is not None:
                    if offsets:
                        damage.setdefault(len(offsets) - 1, skip.describe())
                    pending = skip
                if ti is None:
                    break
                if ti.isdir():
                    continue
                key = split_member(ti.name)[0]
                if key != last:
                    i = len(offsets)
                    offsets.append(ti.offset)  # the first header of the sample (extended headers included)
                    if key in first:
                        duplicates.append((i, first[key]))
                    first.setdefault(key, i)
                    if pending is not None:
                        damage.setdefault(i, pending.describe())
                    last = key
                pending = None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a readable tar file ({e}); remove it from the input or repair it") from e
    return TarIndex(tuple(offsets), tuple(duplicates), tuple(sorted(damage.items())))


def _duplicate_error(name: str, key: str, first: int) -> str:
    return (f"{name}: duplicate key {key!r} (sample {first} has it too); keys must be unique within a tar; "
            "it is left out of the output tar")


def iter_samples(fs: pafs.FileSystem, path: str, stop: int | None = None, start: int = 0,
                 offset: int = 0, index: TarIndex | None = None) -> Iterator[Sample]:
    """The samples of a tar, streamed in order: from sample ``start`` (whose first header is at byte
    ``offset``, see ``tar_index``) up to sample ``stop`` (None: the end). A member that cannot be
    read makes its sample an error row; a tar cut short ends after that sample. ``index`` (the tar's
    discovery) decides duplicate keys and damage over the whole tar, so that a work unit's rows do not
    depend on where it starts; without it they are found within what is read."""
    dups = dict(index.duplicates) if index is not None else None
    damage = dict(index.damage) if index is not None else {}
    stream, walk = _open_walk(fs, path, offset)
    seen: dict[str, int] = {}
    cur: Sample | None = None
    pending: Skip | None = None  # bytes skipped before the next sample's first header
    n = start
    try:
        while True:
            try:
                ti, skip = walk.next()
            except (tarfile.TarError, OSError, EOFError) as e:
                if cur is not None:
                    cur.error = cur.error or f"{cur.key}: the tar ends inside or after this sample ({e})"
                break
            if skip is not None:
                if cur is not None:
                    cur.error = cur.error or skip.describe()
                pending = skip
            if ti is None:
                break
            if ti.isdir():
                continue
            key, ext = split_member(ti.name)
            if cur is None or key != cur.key:
                if cur is not None:
                    yield cur
                    n += 1
                    if stop is not None and n >= stop:
                        return
                cur = Sample(key=key, index=n, error=damage.get(n))
                first = dups.get(n) if dups is not None else seen.get(key)
                if first is not None:
                    cur.duplicate_of = first
                    cur.error = cur.error or _duplicate_error(ti.name, key, first)
                seen.setdefault(key, n)
                if pending is not None:
                    cur.error = cur.error or pending.describe()
            pending = None
            data = None
            if not ti.isfile():
                cur.error = cur.error or f"{ti.name}: not a regular file member ({ti.type!r}); only files are data"
            elif unsafe_name(ti.name):
                cur.error = cur.error or (f"{ti.name}: member name leaves its folder ('..' or absolute); "
                                          "it is left out of the output tar")  # its bytes are skipped unread
            else:
                try:
                    data = walk.read(ti)
                    if len(data) != ti.size:
                        raise tarfile.ReadError(f"read {len(data)} of {ti.size} bytes")
                except (tarfile.TarError, OSError, EOFError) as e:
                    cur.members.append(Member(ti, None))
                    cur.error = f"{ti.name}: truncated member ({e}); the tar ends here"
                    break
                if cur.member(ext) is not None and ext:
                    cur.error = cur.error or f"{ti.name}: duplicate member (two '.{ext}' members for key {key!r})"
            cur.members.append(Member(ti, data))
        if cur is not None and (stop is None or n < stop):
            yield cur
    finally:
        stream.close()


def sample_prompt(s: Sample) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """(prompt, the KEY.json object, error) of a sample: KEY.txt first, else KEY.json's caption/prompt."""
    meta, err = None, None
    js = s.member("json")
    if js is not None and js.data is not None:
        try:
            meta = json.loads(js.data.decode("utf-8"))
            if not isinstance(meta, dict):
                err, meta = f"{js.info.name}: JSON is not an object", None
        except (ValueError, UnicodeDecodeError) as e:
            err = f"{js.info.name}: not valid JSON ({e})"
    txt = s.member("txt")
    if txt is not None and txt.data is not None:
        return txt.data.decode("utf-8", errors="replace").strip() or None, meta, err
    if meta is not None:
        v = next((meta[k] for k in PROMPT_JSON_FIELDS if isinstance(meta.get(k), str)), None)
        return v, meta, err
    return None, meta, err


class TarSink:
    """Writes the output tar, sample by sample, to a temporary name; ``commit`` renames it and returns its size."""

    def __init__(self, fs: pafs.FileSystem, path: str):
        self.fs, self.path = fs, path
        self._file = AtomicFile(fs, path)
        self._tar = tarfile.open(fileobj=self._file.stream, mode="w|", format=tarfile.PAX_FORMAT)

    def _add(self, info: tarfile.TarInfo, data: bytes) -> None:
        ti = tarfile.TarInfo(info.name)
        ti.mtime, ti.mode, ti.uid, ti.gid = info.mtime, info.mode, info.uid, info.gid
        ti.uname, ti.gname, ti.size = info.uname, info.gname, len(data)
        self._tar.addfile(ti, io.BytesIO(data))

    def write(self, sample: Sample, image: bytes | None, fields: dict[str, Any], meta: dict[str, Any] | None) -> None:
        """The sample's members in order: ``image`` replaces the image member's bytes (None: unchanged);
        KEY.json gets ``fields`` merged over its own (appended when the sample had none). A sample
        whose key came before writes nothing: the first one stays, this one is an error row."""
        if sample.duplicate_of is not None:
            return
        img = sample.image
        wrote_json = False
        for m in sample.members:
            if m.data is None or unsafe_name(m.info.name):
                continue  # unreadable or unsafe: the sidecar's error row says which
            data = m.data
            if img is not None and m is img and image is not None:
                data = image
            elif split_member(m.info.name)[1] == "json" and not wrote_json:
                data = json.dumps({**(meta or {}), **fields}, ensure_ascii=False).encode("utf-8")
                wrote_json = True
            self._add(m.info, data)
        if not wrote_json and not unsafe_name(sample.key):
            info = tarfile.TarInfo(f"{sample.key}.json")
            if sample.members:
                info.mtime = sample.members[0].info.mtime
            self._add(info, json.dumps(fields, ensure_ascii=False).encode("utf-8"))

    def commit(self) -> int:
        self._tar.close()
        return self._file.commit()

    def abort(self) -> None:
        try:
            self._tar.close()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        self._file.abort()


def concat_tars(fs: pafs.FileSystem, parts: list[str], dest: str) -> int:
    """One tar from the parts written by a tar's work units, member by member in order (streamed, bytes
    unchanged); written under a temporary name and renamed. Returns its size."""
    sink = TarSink(fs, dest)
    try:
        for part in parts:
            with fs.open_input_stream(part, buffer_size=READ_BLOCK) as f:
                tf = tarfile.open(fileobj=f, mode="r|")
                for ti in tf:
                    data = tf.extractfile(ti).read() if ti.isfile() else b""
                    sink._add(ti, data)
                    tf.members.clear()
    except BaseException:
        sink.abort()
        raise
    return sink.commit()
