"""Image folders: image files with prompts in ``metadata.jsonl`` / ``metadata.csv`` (``file_name`` +
``text``, the Hugging Face imagefolder convention, any folder level) or sidecar ``KEY.txt`` files.

A folder is cut into shards of ``folder_shard_size`` images in sorted path order; each writes its
scores to ``OUT/scores/<folder>-NNNNN.parquet`` (``id``, ``source``, ``prompt``, scores). Refine
mode (and score mode with ``--keep-images``) mirrors every image to ``OUT/images/<same path>``:
the refined image in the file's own format, else the original bytes. When the job ends,
``OUT/metadata.jsonl`` names each mirrored image with its scores, so ``load_dataset("imagefolder",
data_dir=OUT)`` loads images and scores together.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import posixpath
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from grefine_curate.curate.errors import InputError
from grefine_curate.pipelines import columns as C
from grefine_curate.pipelines.commit import try_delete, write_atomic
from grefine_curate.pipelines.formats.base import (
    EXTENSION_FORMATS,
    IMAGE_EXTENSIONS,
    Discovery,
    Format,
    OutputView,
    read_file,
)
from grefine_curate.pipelines.paths import is_hidden_or_state, join, list_files, resolve_fs, safe_relpath
from grefine_curate.pipelines.work import FolderItem, Item, ProcessOptions, Shard, ShardTask, clean_prompt

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
PROMPT_FIELDS = ("prompt", "text", "caption", "txt")
IMAGES_DIR = "images"  # mirrored images under OUT
log = logging.getLogger(__name__)


def _read_text(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8", errors="replace")


def folder_files(fs: pafs.FileSystem, root: str) -> dict[str, pafs.FileInfo]:
    """Every input file under ``root`` (recursive) keyed by its path relative to ``root``; hidden files,
    job state and temporaries left out."""
    infos, _ = list_files(fs, root)  # links leaving the folder or looping are not followed
    files = {posixpath.relpath(i.path, root): i for i in infos}
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
                raise InputError(f"{path}: every row needs a 'file_name' (Hugging Face imagefolder convention){fields}")
            target = posixpath.normpath(join(where, str(row["file_name"]).replace("\\", "/")))
            if target not in files:
                missing.append(str(row["file_name"]))
            yield path, target, row
        if missing:  # rows with no image to go with them: said, not silently dropped
            log.warning("%s: %d row(s) name files that are not in the folder (e.g. %r); they are ignored",
                        path, len(missing), missing[0])


def folder_prompts(fs: pafs.FileSystem, files: dict[str, pafs.FileInfo], prompt_key: str | None) -> dict[str, str | None]:
    """Prompt per image rel path: metadata.jsonl / metadata.csv (any folder level), else sidecar .txt."""
    prompts: dict[str, str | None] = {}
    keys = (prompt_key,) if prompt_key else PROMPT_FIELDS
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


class ImageFolderFormat(Format):
    name = "imagefolder"
    noun = "image"  # in messages: "image files"
    per_file = False
    summary = "image folders: prompts from metadata.jsonl/.csv (file_name + text) or KEY.txt sidecars"

    def claims_file(self, path: str) -> bool:
        return path.lower().endswith(IMAGE_EXTENSIONS)

    def owned(self, paths: set[str]) -> set[str]:
        return {p for p in paths if posixpath.basename(p) in METADATA_FILES or (
            p.endswith(".txt") and any(f"{posixpath.splitext(p)[0]}{e}" in paths for e in IMAGE_EXTENSIONS))}

    def shards(self, fs, base, infos, ctx: Discovery, every=None) -> list[Shard]:
        """Shards of the images ``infos`` under the folder ``base``; ``every`` lists every file there
        (sidecars, metadata)."""
        files = {posixpath.relpath(i.path, base): i for i in (every if every is not None else infos)}
        files = {r: i for r, i in files.items() if not is_hidden_or_state(r)}
        only = {posixpath.relpath(i.path, base) for i in infos}
        images = sorted(r for r in files if r.lower().endswith(IMAGE_EXTENSIONS) and r in only)
        if not images:
            return []
        prompts = folder_prompts(fs, files, ctx.columns.prompt)
        shards = []
        size = ctx.folder_shard_size
        for k in range(0, len(images), size):
            chunk = images[k : k + size]
            items = [FolderItem(rel=r, prompt=prompts.get(r), out_rel=f"{IMAGES_DIR}/{safe_relpath(r)}") for r in chunk]
            digest = hashlib.sha256()
            for it in items:
                info = files[it.rel]
                digest.update(f"{it.rel}\0{info.size}\0{info.mtime_ns}\0{it.prompt}\n".encode())
            shards.append(Shard(format=self.name, fs=fs, path=base,
                                rel=f"scores/{safe_relpath(ctx.name)}-{k // size:05d}.parquet",
                                num_rows=len(items), source_key=digest.hexdigest()[:16], items=items))
        return shards

    def read(self, task: ShardTask, opts: ProcessOptions):
        shard = task.shard

        def batches():
            entries = shard.items[task.start : task.end]
            for k in range(0, len(entries), opts.batch_size):
                items = []
                for e in entries[k : k + opts.batch_size]:
                    it = Item(item_id=e.rel, prompt=clean_prompt(e.prompt), source=e.rel, out_rel=e.out_rel)
                    try:
                        with shard.fs.open_input_stream(join(shard.path, e.rel)) as fh:
                            it.raw = fh.read()
                    except (OSError, pa.ArrowInvalid) as err:
                        it.source_error = f"{e.rel}: cannot read file ({type(err).__name__}: {err})"
                    items.append(it)
                yield None, items

        return None, batches()

    # ---- labelled data (train-pq, eval)

    def check_labelled(self, shard: Shard, columns: list[str], option: str) -> dict[str, dict]:
        """Metadata rows keyed by image path relative to the root; every MOS column checked."""
        rows: dict[str, dict] = {}
        fields: dict[str, None] = {}
        for _, target, row in iter_folder_metadata(shard.fs, folder_files(shard.fs, shard.path)):
            fields.update(dict.fromkeys(row))
            rows[target] = row
        for col in columns:
            if col not in fields:
                raise InputError(
                    f"{shard.path}: no MOS field {col!r} in {' / '.join(METADATA_FILES)}; fields found: "
                    f"{', '.join(fields) or 'none (no metadata file)'}. An image folder carries its MOS in "
                    "metadata.jsonl or metadata.csv next to 'file_name'.")
        return rows

    def labelled(self, shard, columns, batch_rows, checked):
        task = ShardTask(shard=shard, out_fs=None, out_root="")
        for _, items in self.read(task, ProcessOptions(batch_size=batch_rows))[1]:
            for it in items:
                entry = checked.get(it.source, {})
                yield it, {c: entry.get(c) for c in columns}

    # ---- output

    def output_files(self, shard: Shard) -> list[tuple[str, str]]:
        return [(shard.record_rel, shard.path)] + [(it.out_rel or f"{IMAGES_DIR}/{safe_relpath(it.rel)}",
                                             join(shard.path, it.rel)) for it in shard.items]

    def output_schema(self, shard, input_schema, added, opts):
        return pa.schema([pa.field(C.ID, pa.string()), pa.field(C.SOURCE, pa.string()),
                          pa.field(C.PROMPT, pa.string())] + added)

    def output_batch(self, task, raw, items, schema, cols, opts):
        if opts.mode == "refine" or opts.keep_images:
            self._write_images(task, items)
        head = {C.ID: pa.array([it.item_id for it in items], pa.string()),
                C.SOURCE: pa.array([it.source for it in items], pa.string()),
                C.PROMPT: pa.array([it.prompt for it in items], pa.string())}
        merged = {**head, **cols}
        return pa.RecordBatch.from_arrays([merged[f.name] for f in schema], schema=schema)

    def encoding(self, item: Item, opts: ProcessOptions) -> str:
        return EXTENSION_FORMATS.get(posixpath.splitext(item.item_id)[1].lower(), opts.image_format)

    def _write_images(self, task: ShardTask, items: list[Item]) -> None:
        """OUT/images/<same relative path>: the refined image in the file's own format, else the original bytes."""
        for it in items:
            if it.encoded is not None and it.error is None:
                data = it.encoded
            elif it.raw is not None:
                data = it.raw  # unchanged (skip, reverted, score mode, and error rows: the mirror stays complete)
            else:
                continue
            write_atomic(task.out_fs, join(task.out_root, it.out_rel or f"{IMAGES_DIR}/{safe_relpath(it.item_id)}"), data)

    def drop_past(self, fs, root, shard, new_rows, done_rows):
        for item in shard.items[new_rows:done_rows]:
            try_delete(fs, join(root, item.out_rel or f"{IMAGES_DIR}/{safe_relpath(item.rel)}"))
        if new_rows == 0:
            try_delete(fs, join(root, shard.record_rel))

    def finish(self, fs, root, shards, mode, keep_images):
        """OUT/metadata.jsonl: each mirrored image (``file_name``) with its scores, the Hub's imagefolder
        convention, so ``load_dataset("imagefolder", data_dir=OUT)`` loads them together."""
        if not (mode == "refine" or keep_images) or not shards:
            return
        import pyarrow.parquet as pq

        lines = []
        for shard in shards:
            with fs.open_input_file(join(root, shard.record_rel)) as f:
                t = pq.ParquetFile(f).read()
            keep = [n for n in t.column_names if n not in (C.ID,) and not pa.types.is_binary(t.schema.field(n).type)]
            for row in t.select(keep).to_pylist():
                src = row.get(C.SOURCE)
                if src:
                    lines.append(json.dumps({"file_name": f"{IMAGES_DIR}/{safe_relpath(src)}", **row}, ensure_ascii=False))
        write_atomic(fs, join(root, "metadata.jsonl"), ("\n".join(lines) + "\n").encode())

    # ---- reading back

    def image_keys(self, view, names):
        return [C.SOURCE]

    def location(self, view, index, item_id, source):
        if view.mode == "refine" or view.keep_images:
            return f"{IMAGES_DIR}/{safe_relpath(source or item_id)} (scores: {view.rel} row {index})"
        return f"{view.rel} row {index} (image: {source or item_id} in the input folder)"

    def images(self, view: OutputView, rows: pa.Table, indices: list[int], final: bool):
        sources = rows.column(C.SOURCE).to_pylist()
        mirrored = view.mode == "refine" or view.keep_images
        out = []
        in_fs, in_root = resolve_fs(view.input) if view.input else (None, None)
        for src in sources:
            if not src:
                out.append((None, None))
                continue
            data = None
            if final and mirrored:
                data = read_file(view.out_fs, join(view.out_root, f"{IMAGES_DIR}/{safe_relpath(src)}"))
            elif in_fs is not None:
                data = read_file(in_fs, join(in_root, src))
            out.append((data, src))
        return out


FORMAT = ImageFolderFormat()
