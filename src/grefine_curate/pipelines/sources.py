"""Finding the inputs of a job: files, folders and globs, local or on an object store (``pyarrow.fs``).

Each input is handed to the registered formats (``formats/``): a folder that one format claims as a
whole (a ``save_to_disk`` folder) is that format's; otherwise every file goes to the format that
claims it by name (Parquet, WebDataset tars: a shard per file; image folders: images grouped into
shards), after the formats took the files they own without reading them (a tar's img2dataset
sidecar, an image's ``.txt``, ``metadata.jsonl``).

Everything here reads metadata only (listings, footers, headers): the whole input is checked
(columns present, types usable, no two inputs on one output) before any image is touched, so a bad
command fails in seconds with a message that names the problem (exit code 2).
"""

from __future__ import annotations

import logging
import posixpath
import re

import pyarrow.fs as pafs

from grefine_curate.curate.errors import InputError
from grefine_curate.pipelines.formats import all_formats, get_format
from grefine_curate.pipelines.formats.base import Discovery
from grefine_curate.pipelines.formats.folder import folder_files, iter_folder_metadata  # noqa: F401 (labelled)
from grefine_curate.pipelines.formats.parquet import (  # noqa: F401 (re-exported names)
    ID_COLUMN_CANDIDATES,
    IMAGE_COLUMN_CANDIDATES,
    PROMPT_COLUMN_CANDIDATES,
)
from grefine_curate.pipelines.paths import (  # noqa: F401 (re-exported: older imports)
    LEGACY_STATE_DIR,
    STATE_DIR,
    TMP_MARK,
    fs_uri,
    inside,
    is_hidden_or_state,
    join,
    list_files,
    resolve_fs,
    safe_relpath,
    store_error,
)
from grefine_curate.pipelines.work import ColumnSpec, FolderItem, Shard  # noqa: F401

log = logging.getLogger(__name__)


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
    return [i for i in infos if not any(inside(i.path, r) for r in nested)]


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


def _list_files(fs: pafs.FileSystem, root: str, uri: str) -> list[pafs.FileInfo]:
    try:
        infos, skipped = list_files(fs, root)
    except FileNotFoundError:
        raise
    except OSError as e:
        if isinstance(fs, pafs.LocalFileSystem):
            raise InputError(f"{uri}: cannot list ({e})") from e
        raise store_error(uri, e) from e
    if skipped:  # said, never silent
        log.warning("%s: %d link(s) not followed, e.g. %s", uri, len(skipped), skipped[0])
    return infos


def _rel(root: str, path: str) -> str:
    return posixpath.relpath(path, root) if root else path


def _by_format(uri: str, fs: pafs.FileSystem, base: str, infos: list, every: list, ctx: Discovery) -> list[Shard]:
    """The shards of a listing: each file to the format that claims it; one input never mixes a
    per-file format with a grouped one (Parquet files beside loose images are two inputs)."""
    paths = {i.path for i in infos}
    owned: set[str] = set()
    for fmt in all_formats():
        owned |= fmt.owned(paths)
    claimed: dict[str, list] = {}
    for info in infos:
        if info.path in owned:
            continue
        fmt = next((f for f in all_formats() if f.claims_file(info.path)), None)
        if fmt is not None:
            claimed.setdefault(fmt.name, []).append(info)
    formats = {f.name: f for f in all_formats()}
    grouped = [n for n in claimed if not formats[n].per_file]
    per_file = [n for n in claimed if formats[n].per_file]
    if grouped and per_file:
        a, b = claimed[per_file[0]][0].path, claimed[grouped[0]][0].path
        raise InputError(
            f"{uri}: holds both {' and '.join(formats[n].noun for n in per_file)} files (e.g. {a}) and "
            f"{' and '.join(formats[n].noun for n in grouped)} files "
            f"(e.g. {b}); pass them as separate inputs (for example a glob '*.parquet' and a sub-folder)")
    shards: list[Shard] = []
    for name, claimed_infos in claimed.items():
        fmt = formats[name]
        shards += fmt.shards(fs, base, sorted(claimed_infos, key=lambda i: i.path), ctx,
                             every=every if not fmt.per_file else None)
    return sorted(shards, key=lambda s: s.path) if not grouped else shards


def discover(inputs: list[str], columns: ColumnSpec = ColumnSpec(), out: str | None = None,
             folder_shard_size: int = 1000) -> list[Shard]:
    """All shards of the inputs, in input order, checked (columns, types, output names) before any work.

    Raises InputError for an empty input, a missing column (naming the columns found), an unreadable
    footer or header, or two inputs (files, or images of one folder) whose outputs would land on one path.
    """
    if not inputs:
        raise InputError("no input given: pass one or more Parquet files, directories, globs or image folders")
    out_path = resolve_fs(out)[1].rstrip("/") if out else None
    shards: list[Shard] = []
    for uri in inputs:
        fs, path = resolve_fs(uri)
        base = path.split("*")[0].split("?")[0].split("[")[0].rstrip("/") or "/"
        if out_path and inside(base, out_path):  # outputs are never read back: nothing would be found
            raise InputError(
                f"{uri}: this input is {'the --out folder itself' if base == out_path else 'inside --out ' + out_path}; "
                "a job never reads its own output folder as input. Choose an --out outside the input, "
                f"e.g. {base.rstrip('/')}-curated"
            )
        found = _discover_one(fs, path, uri, columns, out_path, folder_shard_size)
        if not found:
            kinds = "; ".join(f.summary for f in all_formats())
            raise InputError(f"{uri}: no input found (the formats read: {kinds}); check the path")
        shards.extend(found)
    _refuse_clashes(shards)
    return shards


def _refuse_clashes(shards: list[Shard]) -> None:
    """Every input item has its own output: two inputs on one output path are refused, naming both."""
    seen: dict[str, str] = {}
    clashes: list[str] = []
    for s in shards:
        for key, source in get_format(s.format).output_files(s):
            if key in seen and seen[key] != source:
                clashes.append(f"the same output {key!r}: {seen[key]} and {source}")
            seen.setdefault(key, source)
    skipped_by_readers = [k for k in seen if any(p.startswith(("_", ".")) for p in k.split("/"))]
    if skipped_by_readers:  # pandas, pyarrow.dataset and datasets skip such names when reading OUT
        log.warning("%d output(s) will have names that pandas / pyarrow.dataset / datasets skip when reading the "
                    "output folder (a part starting with '_' or '.'), e.g. %s; rename the inputs to keep them "
                    "visible, or read those files by name", len(skipped_by_readers), skipped_by_readers[0])
    if clashes:
        more = f" (and {len(clashes) - 3} more)" if len(clashes) > 3 else ""
        raise InputError(
            f"two inputs map to {'; '.join(clashes[:3])}{more}. Output names drop characters that "
            "are not portable (: * ? \" < > | control characters, leading/trailing spaces); rename the inputs, or "
            "run them into separate --out directories")


def _discover_one(fs: pafs.FileSystem, path: str, uri: str, columns: ColumnSpec, out_path: str | None,
                  folder_shard_size: int) -> list[Shard]:
    if any(c in path for c in "*?["):
        parts = path.split("/")
        k = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
        base = "/".join(parts[:k]) or "/"
        rx = _glob_regex(path)
        try:
            every = [i for i in _list_files(fs, base, uri) if not inside(i.path, out_path)]
        except FileNotFoundError:
            every = []
        infos = [i for i in every if rx.match(i.path) and not is_hidden_or_state(_rel(base, i.path))]
        ctx = Discovery(columns, folder_shard_size, posixpath.basename(base.rstrip("/")) or "images")
        return _by_format(uri, fs, base, sorted(infos, key=lambda i: i.path), every, ctx)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise (InputError(f"{uri}: {e}") if isinstance(fs, pafs.LocalFileSystem) else store_error(uri, e)) from e
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{uri}: no such file or directory")
    if info.type == pafs.FileType.File:
        parent = posixpath.dirname(path)
        fmt = next((f for f in all_formats() if f.claims_file(path)), None)
        if fmt is None:
            names = ", ".join(f.name for f in all_formats())
            raise InputError(f"{uri}: no format reads this file (formats: {names}); pass a file or folder of one")
        ctx = Discovery(columns, folder_shard_size, posixpath.splitext(posixpath.basename(path))[0])
        every = None
        if not fmt.per_file:  # an image: its folder's sidecars and metadata give its prompt
            every = [i for i in fs.get_file_info(pafs.FileSelector(parent, recursive=False))
                     if i.type == pafs.FileType.File]
        return fmt.shards(fs, parent, [info], ctx, every=every)
    infos = _without_nested_outputs([i for i in _list_files(fs, path, uri) if not inside(i.path, out_path)], path)
    hidden = [i for i in infos if is_hidden_or_state(_rel(path, i.path))]
    infos = [i for i in infos if not is_hidden_or_state(_rel(path, i.path))]
    _warn_hidden(uri, path, hidden)
    ctx = Discovery(columns, folder_shard_size, posixpath.basename(path.rstrip("/")) or "images")
    whole = next((f for f in all_formats() if f.claims_dir(fs, path, infos)), None)
    if whole is not None:
        return whole.shards(fs, path, infos, ctx)
    return _by_format(uri, fs, path, infos, infos, ctx)


def _warn_hidden(uri: str, root: str, hidden: list) -> None:
    """Hidden files and folders ('.x') are not read; said once, so nothing is skipped without a word."""
    data = [i for i in hidden if TMP_MARK not in i.path and not any(
        p in (STATE_DIR, LEGACY_STATE_DIR) for p in _rel(root, i.path).split("/"))]
    if data:
        log.warning("%s: %d hidden file(s) (names starting with '.', e.g. %s) are not read; rename them to include "
                    "them", uri, len(data), _rel(root, data[0].path))
