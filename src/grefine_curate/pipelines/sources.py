"""Data sources of the curation job: Parquet shards, WebDataset tars and image folders, found through ``pyarrow.fs``.

A *shard* is one input file and one output file: a Parquet input gives one shard per file (a file,
a directory searched recursively, or a glob), a WebDataset input one per ``.tar`` (see
tar_shards.py); an image folder is cut into shards of ``folder_shard_size`` images in sorted path
order. Shards are cut further into work units (units.py), the unit of scheduling, retry and resume.
Prompts of a folder come from sidecar ``.txt`` files or from ``metadata.jsonl`` / ``metadata.csv``
(``file_name`` + ``text``, the Hugging Face imagefolder convention).

Everything here reads metadata only (file listings, Parquet footers): the whole input is checked
(columns present, types usable, no output-name clash) before any image is touched, so a bad
command fails in seconds with a message that names the problem (exit code 2).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from grefine_curate.curate.errors import InputError

IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "jpeg", "png", "webp", "image_bytes")
PROMPT_COLUMN_CANDIDATES = ("prompt", "text", "caption", "txt")
ID_COLUMN_CANDIDATES = ("id", "key", "uid")  # picked automatically when of string or integer type
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
log = logging.getLogger(__name__)
TMP_MARK = ".grefine-tmp-"  # temporary output files carry this in their name (never read as input)
STATE_DIR = "__grefine__"  # job state and report under OUT; data readers skip '__' names (pipelines/layout.py)
LEGACY_STATE_DIR = "_grefine"  # where outputs of earlier versions kept it (still never read as input)


@dataclass(frozen=True)
class ColumnSpec:
    """Which columns hold the image, the prompt and the id (None = detect / default)."""

    image: str | None = None  # None: first of IMAGE_COLUMN_CANDIDATES present
    prompt: str | None = None  # None: first of PROMPT_COLUMN_CANDIDATES present, else PQ only
    id: str | None = None  # None: first of ID_COLUMN_CANDIDATES present, else "<shard relative path>#<row index>"


@dataclass
class FolderItem:
    rel: str  # path of the image relative to the folder root (POSIX separators)
    prompt: str | None


@dataclass
class Shard:
    """One input (and output) file. Picklable: it travels to Ray actors."""

    kind: str  # "parquet" | "folder" | "tar"
    fs: pafs.FileSystem
    path: str  # parquet: the file; folder: the folder root
    rel: str  # output name relative to OUT (parquet: same relative path; folder: scores/<name>-NNNNN.parquet)
    num_rows: int
    source_key: str  # changes when the input changes (size/mtime/listing): resume recomputes then
    image_column: str | None = None  # parquet only (resolved)
    image_is_struct: bool = False  # Hugging Face {bytes, path} struct
    prompt_column: str | None = None
    id_column: str | None = None
    items: list[FolderItem] = field(default_factory=list)  # folder only
    row_groups: tuple[int, ...] = ()  # parquet only: rows per row group (work units are whole row groups)
    tar_offsets: tuple[int, ...] = ()  # tar only: byte offset of each sample's first header (units start there)

    @property
    def label(self) -> str:
        return self.rel

    @property
    def record_rel(self) -> str:
        """The Parquet output that carries the commit record: the shard's own output, or a tar's sidecar."""
        return posixpath.splitext(self.rel)[0] + ".parquet" if self.kind == "tar" else self.rel


# ---------------------------------------------------------------------------------------------
# Paths


def resolve_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or any URI pyarrow supports (s3://, gs://, hdfs://, file://)."""
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise InputError(f"cannot open {uri!r}: {e} (is the URI scheme supported by this pyarrow build?)") from e
    import os

    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri)).replace("\\", "/")


def fs_uri(fs: pafs.FileSystem, path: str) -> str:
    """The URI of a (filesystem, path) pair, inverse of resolve_fs: a plain path for local files."""
    scheme = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs"}.get(fs.type_name)
    return f"{scheme}://{path}" if scheme else path


def join(base: str, rel: str) -> str:
    return posixpath.join(base.rstrip("/"), rel) if base else rel


def safe_relpath(rel: str) -> str:
    """A relative output path that cannot leave its root: no absolute part, no '..', no empty parts.

    Output names derive from input file names and ids, which are data: '../../etc/x', 'C:\\x' or
    '/abs' must never write outside OUT. Unsafe parts are dropped; odd characters are replaced.
    """
    parts = []
    for part in re.split(r"[\\/]+", rel):
        part = part.strip()
        if part in ("", ".", ".."):
            continue
        part = re.sub(r"[\x00-\x1f:*?\"<>|]", "_", part)  # control chars and Windows-reserved ones
        parts.append(part)
    if not parts:
        raise InputError(f"cannot derive a safe output name from {rel!r}")
    return "/".join(parts)


def is_hidden_or_state(rel: str) -> bool:
    """Hidden files (".x"), our job state (__grefine__/, formerly _grefine/) and our temporaries are never input data."""
    return any(p.startswith(".") or p in (STATE_DIR, LEGACY_STATE_DIR) for p in rel.split("/")) or TMP_MARK in rel


def _without_nested_outputs(infos: list, root: str) -> list:
    """Drop the outputs of earlier jobs written inside an input folder (they hold __grefine__/manifest.json).

    Reading them back would mix our own score files into the data. The input folder itself may be
    an earlier output (chaining jobs is fine); only nested ones are skipped, with a warning.
    """
    nested = set()
    for state in (STATE_DIR, LEGACY_STATE_DIR):
        marker = f"/{state}/manifest.json"
        nested |= {i.path[: -len(marker)] for i in infos if i.path.endswith(marker)}
    nested.discard(root.rstrip("/"))
    for r in sorted(nested):
        log.warning("skipping %s: it is the output of an earlier grefine-curate job (it holds %s/manifest.json); "
                    "pass it as an input of its own to process it", r, STATE_DIR)
    return [i for i in infos if not any(_inside(i.path, r) for r in nested)]


def _refuse_mixed(where: str, pq_infos: list, infos: list) -> None:
    images = [i for i in infos if i.path.lower().endswith(IMAGE_EXTENSIONS)]
    if pq_infos and images:
        tars = sum(_is_tar(i.path) for i in pq_infos)
        what = "tar" if tars == len(pq_infos) else "Parquet" if not tars else "Parquet and tar"
        raise InputError(
            f"{where}: holds both {what} files ({len(pq_infos)}, e.g. {pq_infos[0].path}) and image files "
            f"({len(images)}, e.g. {images[0].path}); pass the Parquet files and the image folder as separate "
            "inputs (for example a glob '*.parquet' and a sub-folder)"
        )


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Glob to regex: '**' spans directories, '*' and '?' stay within one path part."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1 : j].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _list_files(fs: pafs.FileSystem, root: str) -> list[pafs.FileInfo]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return [i for i in infos if i.type == pafs.FileType.File]


def _rel(root: str, path: str) -> str:
    return posixpath.relpath(path, root) if root else path


# ---------------------------------------------------------------------------------------------
# Parquet


def _parquet_shard(fs: pafs.FileSystem, info: pafs.FileInfo, rel: str, columns: ColumnSpec) -> Shard:
    try:
        with fs.open_input_file(info.path) as f:
            meta = pq.ParquetFile(f).metadata
            schema = meta.schema.to_arrow_schema()
            num_rows = meta.num_rows
            row_groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{info.path}: not a readable Parquet file ({e}); remove it from the input or repair it") from e
    names = schema.names
    found = ", ".join(f"{n} ({schema.field(n).type})" for n in names)

    def pick(explicit: str | None, candidates: tuple[str, ...], what: str, option: str) -> str | None:
        if explicit is not None:
            if explicit not in names:
                raise InputError(
                    f"{info.path}: no {what} column {explicit!r}; columns found: {found}. Pass {option} with one of them."
                )
            return explicit
        return next((c for c in candidates if c in names), None)

    image_col = pick(columns.image, IMAGE_COLUMN_CANDIDATES, "image", "--image-column")
    if image_col is None:
        raise InputError(
            f"{info.path}: no image column found (looked for {', '.join(IMAGE_COLUMN_CANDIDATES)}); "
            f"columns found: {found}. Pass --image-column NAME."
        )
    itype = schema.field(image_col).type
    is_struct = pa.types.is_struct(itype)
    if is_struct:
        child_names = [itype.field(i).name for i in range(itype.num_fields)]
        if "bytes" not in child_names or not _is_binary(itype.field("bytes").type):
            raise InputError(
                f"{info.path}: image column {image_col!r} is a struct without a binary 'bytes' field "
                f"({itype}); expected raw bytes or the Hugging Face {{bytes, path}} struct."
            )
    elif not _is_binary(itype):
        raise InputError(
            f"{info.path}: image column {image_col!r} has type {itype}; expected binary (encoded image bytes) "
            f"or the Hugging Face {{bytes, path}} struct. Columns found: {found}."
        )
    prompt_col = pick(columns.prompt, PROMPT_COLUMN_CANDIDATES, "prompt", "--prompt-column")
    if prompt_col is not None:
        ptype = schema.field(prompt_col).type
        if not (pa.types.is_string(ptype) or pa.types.is_large_string(ptype) or pa.types.is_null(ptype)):
            raise InputError(f"{info.path}: prompt column {prompt_col!r} has type {ptype}; expected string.")
    id_col = pick(columns.id, (), "id", "--id-column")
    if id_col is None:  # an id column found by name is used only when it holds plain values
        id_col = next((c for c in ID_COLUMN_CANDIDATES if c in names and (
            pa.types.is_string(schema.field(c).type) or pa.types.is_large_string(schema.field(c).type)
            or pa.types.is_integer(schema.field(c).type))), None)
    source_key = f"{info.size}:{info.mtime_ns}"
    return Shard(kind="parquet", fs=fs, path=info.path, rel=rel, num_rows=num_rows, source_key=source_key,
                 image_column=image_col, image_is_struct=is_struct, prompt_column=prompt_col, id_column=id_col,
                 row_groups=row_groups)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) or (
        hasattr(pa.types, "is_binary_view") and pa.types.is_binary_view(t)
    )


# ---------------------------------------------------------------------------------------------
# WebDataset tars


def _tar_shard(fs: pafs.FileSystem, info: pafs.FileInfo, rel: str) -> Shard:
    from grefine_curate.pipelines.tar_shards import sample_offsets

    offsets = tuple(sample_offsets(fs, info.path))
    return Shard(kind="tar", fs=fs, path=info.path, rel=rel, num_rows=len(offsets),
                 source_key=f"{info.size}:{info.mtime_ns}", tar_offsets=offsets)


def _is_tar(path: str) -> bool:
    return path.lower().endswith(".tar")


def _without_sidecars(pq_infos: list, tar_infos: list) -> list:
    """Parquet files beside a tar of the same name are its sidecar (img2dataset, or our own output): not input."""
    stems = {i.path[:-4] for i in tar_infos}
    return [i for i in pq_infos if i.path[: -len(".parquet")] not in stems]


def _file_shards(fs: pafs.FileSystem, base: str, pq_infos: list, tar_infos: list, columns: ColumnSpec) -> list[Shard]:
    """Parquet and tar shards of a listing, in path order."""
    pq_infos = _without_sidecars(pq_infos, tar_infos)
    out = []
    for i in sorted(pq_infos + tar_infos, key=lambda i: i.path):
        rel = safe_relpath(_rel(base, i.path))
        out.append(_tar_shard(fs, i, rel) if _is_tar(i.path) else _parquet_shard(fs, i, rel, columns))
    return out


# ---------------------------------------------------------------------------------------------
# Image folders


def _read_text(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8", errors="replace")


def folder_files(fs: pafs.FileSystem, root: str) -> dict[str, pafs.FileInfo]:
    """Every input file under ``root`` (recursive) keyed by its path relative to ``root``; hidden files,
    job state and temporaries left out."""
    files = {_rel(root, i.path): i for i in _list_files(fs, root)}
    return {r: i for r, i in files.items() if not is_hidden_or_state(r)}


def iter_folder_metadata(fs: pafs.FileSystem, files: dict[str, pafs.FileInfo]) -> Iterator[tuple[str, str, dict]]:
    """(metadata file path, image rel path, row with all its fields) for every row of every
    ``metadata.jsonl`` / ``metadata.csv`` in ``files`` (any folder level; rel paths as ``folder_files``).

    Hugging Face imagefolder convention: ``file_name`` is relative to the metadata file's folder.
    Raises InputError for invalid JSON or a row without ``file_name``.
    """
    for rel in sorted(files):
        base = posixpath.basename(rel)
        if base not in METADATA_FILES:
            continue
        where = posixpath.dirname(rel)
        path = files[rel].path
        text = _read_text(fs, path)
        if base.endswith(".jsonl"):
            rows = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}: line {n} is not valid JSON ({e})") from e
        else:
            rows = list(csv.DictReader(io.StringIO(text)))
        missing = []
        for row in rows:
            if not isinstance(row, dict) or "file_name" not in row:
                fields = f"; fields found: {', '.join(row)}" if isinstance(row, dict) else ""
                raise InputError(
                    f"{path}: every row needs a 'file_name' (Hugging Face imagefolder convention){fields}"
                )
            target = posixpath.normpath(join(where, str(row["file_name"]).replace("\\", "/")))
            if target not in files:
                missing.append(str(row["file_name"]))
            yield path, target, row
        if missing:  # rows with no image to go with them: said, not silently dropped
            log.warning("%s: %d row(s) name files that are not in the folder (e.g. %r); they are ignored",
                        path, len(missing), missing[0])


def _folder_prompts(fs: pafs.FileSystem, root: str, files: dict[str, pafs.FileInfo], prompt_key: str | None) -> dict[str, str | None]:
    """Prompt per image rel path: metadata.jsonl / metadata.csv (any folder level), else sidecar .txt."""
    prompts: dict[str, str | None] = {}
    keys = (prompt_key,) if prompt_key else PROMPT_COLUMN_CANDIDATES
    for meta_path, target, row in iter_folder_metadata(fs, files):
        key = next((k for k in keys if k in row), None)
        if key is None and prompt_key:
            raise InputError(f"{meta_path}: no prompt field {prompt_key!r}; fields found: {', '.join(row)}")
        prompts[target] = None if key is None or row[key] is None else str(row[key])
    for rel in files:
        if rel.lower().endswith(IMAGE_EXTENSIONS) and rel not in prompts:
            sidecar = posixpath.splitext(rel)[0] + ".txt"
            if sidecar in files:
                prompts[rel] = _read_text(fs, files[sidecar].path).strip()
    return prompts


def _folder_shards(fs: pafs.FileSystem, root: str, infos: list[pafs.FileInfo], name: str,
                   columns: ColumnSpec, shard_size: int, only: set[str] | None = None) -> list[Shard]:
    """Shards of an image folder; ``infos`` lists every file under ``root`` (sidecars, metadata),
    ``only`` restricts the images to these rel paths (a glob or a single file)."""
    files = {_rel(root, i.path): i for i in infos}
    files = {r: i for r, i in files.items() if not is_hidden_or_state(r)}
    images = sorted(r for r in files if r.lower().endswith(IMAGE_EXTENSIONS) and (only is None or r in only))
    if not images:
        return []
    prompts = _folder_prompts(fs, root, files, columns.prompt)
    shards = []
    for k in range(0, len(images), shard_size):
        chunk = images[k : k + shard_size]
        items = [FolderItem(rel=r, prompt=prompts.get(r)) for r in chunk]
        digest = hashlib.sha256()
        for it in items:
            info = files[it.rel]
            digest.update(f"{it.rel}\0{info.size}\0{info.mtime_ns}\0{it.prompt}\n".encode())
        shards.append(Shard(kind="folder", fs=fs, path=root, rel=f"scores/{safe_relpath(name)}-{k // shard_size:05d}.parquet",
                            num_rows=len(items), source_key=digest.hexdigest()[:16], items=items))
    return shards


# ---------------------------------------------------------------------------------------------
# Discovery


def discover(inputs: list[str], columns: ColumnSpec = ColumnSpec(), out: str | None = None,
             folder_shard_size: int = 1000) -> list[Shard]:
    """All shards of the inputs, in input order, checked (columns, types, output names) before any work.

    Raises InputError for an empty input, a missing column (naming the columns found), an unreadable
    Parquet footer, or two inputs whose outputs would land on the same path.
    """
    if not inputs:
        raise InputError("no input given: pass one or more Parquet files, directories, globs or image folders")
    out_path = resolve_fs(out)[1].rstrip("/") if out else None
    shards: list[Shard] = []
    for uri in inputs:
        fs, path = resolve_fs(uri)
        base = path.split("*")[0].split("?")[0].split("[")[0].rstrip("/") or "/"
        if out_path and _inside(base, out_path):  # outputs are never read back: nothing would be found
            raise InputError(
                f"{uri}: this input is {'the --out folder itself' if base == out_path else 'inside --out ' + out_path}; "
                "a job never reads its own output folder as input. Choose an --out outside the input, "
                f"e.g. {base.rstrip('/')}-curated"
            )
        found = _discover_one(fs, path, uri, columns, out_path, folder_shard_size)
        if not found:
            raise InputError(
                f"{uri}: no input found (no .parquet or .tar files and no images with extensions "
                f"{', '.join(IMAGE_EXTENSIONS)}); check the path"
            )
        shards.extend(found)
    seen: dict[str, str] = {}
    for s in shards:
        keys = [s.rel] + ([s.record_rel] if s.record_rel != s.rel else []) + [f"images/{safe_relpath(it.rel)}" for it in s.items]
        for key in keys:
            if key in seen and seen[key] != s.path:
                raise InputError(
                    f"two inputs map to the same output {key!r}: {seen[key]} and {s.path}; "
                    "run them into separate --out directories"
                )
            seen[key] = s.path
    return shards


def _inside(path: str, root: str | None) -> bool:
    return bool(root) and (path == root or path.startswith(root + "/"))


def _discover_one(fs: pafs.FileSystem, path: str, uri: str, columns: ColumnSpec, out_path: str | None,
                  folder_shard_size: int) -> list[Shard]:
    if any(c in path for c in "*?["):
        parts = path.split("/")
        k = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
        base = "/".join(parts[:k]) or "/"
        rx = _glob_regex(path)
        try:
            infos = [i for i in _list_files(fs, base) if rx.match(i.path)]
        except FileNotFoundError:
            infos = []
        infos = [i for i in infos if not _inside(i.path, out_path) and not is_hidden_or_state(_rel(base, i.path))]
        infos = sorted(infos, key=lambda i: i.path)
        pq_infos = [i for i in infos if i.path.endswith(".parquet")]
        tar_infos = [i for i in infos if _is_tar(i.path)]
        _refuse_mixed(uri, pq_infos + tar_infos, infos)
        if pq_infos or tar_infos:
            return _file_shards(fs, base, pq_infos, tar_infos, columns)
        only = {_rel(base, i.path) for i in infos if i.path.lower().endswith(IMAGE_EXTENSIONS)}
        if not only:
            return []
        every = [i for i in _list_files(fs, base) if not _inside(i.path, out_path)]
        return _folder_shards(fs, base, every, posixpath.basename(base.rstrip("/")) or "images", columns,
                              folder_shard_size, only)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{uri}: no such file or directory")
    if info.type == pafs.FileType.File:
        if path.endswith(".parquet"):
            return [_parquet_shard(fs, info, safe_relpath(posixpath.basename(path)), columns)]
        if _is_tar(path):
            return [_tar_shard(fs, info, safe_relpath(posixpath.basename(path)))]
        if path.lower().endswith(IMAGE_EXTENSIONS):
            parent = posixpath.dirname(path)
            every = fs.get_file_info(pafs.FileSelector(parent, recursive=False))
            every = [i for i in every if i.type == pafs.FileType.File]
            return _folder_shards(fs, parent, every, posixpath.splitext(posixpath.basename(path))[0], columns,
                                  folder_shard_size, {posixpath.basename(path)})
        raise InputError(f"{uri}: not a .parquet file, a WebDataset .tar, an image or a directory")
    infos = _without_nested_outputs([i for i in _list_files(fs, path) if not _inside(i.path, out_path)], path)
    infos = [i for i in infos if not is_hidden_or_state(_rel(path, i.path))]
    pq_infos = [i for i in infos if i.path.endswith(".parquet")]
    tar_infos = [i for i in infos if _is_tar(i.path)]
    _refuse_mixed(uri, pq_infos + tar_infos, infos)
    if pq_infos or tar_infos:
        return _file_shards(fs, path, pq_infos, tar_infos, columns)
    name = posixpath.basename(path.rstrip("/")) or "images"
    return _folder_shards(fs, path, infos, name, columns, folder_shard_size)
