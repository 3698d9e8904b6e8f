"""Shard writer: splits, size-bounded zstd Parquet shards in deterministic order, card, atomic swap.

One ``outputs[i]`` entry becomes, under its ``path``::

    data/<split>-00000-of-000NN.parquet   zstd shards of about ``shard_size_mb``, in row order
    README.md                             dataset card (data_cards/ template, YAML front matter)
    token_lengths.png, difficulty.png     plots the card shows
    recipe.yaml                           the recipe (secrets scrubbed)
    summary.json                          the card's numbers (the report reads them)
    stats.json, output.json               run stats and what was written (local bookkeeping)
    dataset_info.json                     sharegpt only: the LLaMA-Factory entry

The formatted rows are streamed once to a staging file, then cut per split into shards, so memory
stays bounded by a row group. Row groups hold ``row_group_rows`` rows, fewer when rows are wide
(at most ~64 MiB of Arrow data per group), so streaming readers (``datasets`` streaming, the Hub
viewer) fetch small pieces. Shards fill up greedily to ``shard_size_mb`` in row order and are
written with content-defined chunking and a page index: the same rows give byte-identical files,
and appending rows leaves earlier shards' bytes unchanged, so a re-push uploads only new content.

Everything is written into a temporary directory next to the output and swapped in at the end
(readers see the old set or the new one). ``path`` may be an fsspec URL: the files are built
locally and copied there. With ``push:`` set, the output is pushed after it is written
(``TRACEPIPE_NO_PUSH=1`` skips that; ``tracepipe push`` pushes later).

Options every format understands: ``where`` (SQL filter over the final rows before formatting),
``curriculum_order`` (default true: rows ranked by ``select: {curriculum: ...}`` are written in
``curriculum_rank`` order) and ``card`` (``license``, ``language``, ``task_categories``, ``tags``, ``pretty_name``, ``text``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - RecordBatch.cast needs it; loaded here, not inside a write
import pyarrow.parquet as pq
import xxhash

from tracepipe.outputs import _card, get_format, is_row_local
from tracepipe.outputs._common import option_bool
from tracepipe.outputs._secrets import recipe_secret_env_names, scrub, scrub_obj
from tracepipe.pipeline.frames import digest_of, scan_parts

log = logging.getLogger(__name__)

SPLIT_COL = "__split"
WRITER_VERSION = "2"
#: an appending rerun adds shards; a split with this many (or twice what a fresh write would
#: make, if more) is rewritten compactly instead
APPEND_MAX_SHARDS = 8
ROW_GROUP_MAX_BYTES = 64 * 2**20
#: top-level names the writer owns in an output directory (others are left alone)
MANAGED = ("data", "README.md", "recipe.yaml", "stats.json", "output.json", "summary.json",
           "dataset_info.json", "token_lengths.png", "difficulty.png")


def split_expr(test_fraction: float) -> pl.Expr:
    """``train`` / ``test`` by a stable hash of the problem id (all samples of a problem together)."""
    if test_fraction <= 0:
        return pl.lit("train")
    cut = int(test_fraction * 2**32)

    def buckets(s: pl.Series) -> pl.Series:
        return pl.Series([xxhash.xxh32_intdigest(v.encode()) if v is not None else 2**32 - 1 for v in s.to_list()], dtype=pl.UInt32)

    bucket = pl.col("id").cast(pl.String).map_batches(buckets, return_dtype=pl.UInt32)
    return pl.when(bucket < cut).then(pl.lit("test")).otherwise(pl.lit("train"))


def _small_types(t: pa.DataType) -> pa.DataType:
    """large_string / large_list -> string / list: row groups stay far below 2 GiB, and every
    reader (older ``datasets``, Spark, DuckDB) takes the 32-bit offset types."""
    if pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_large_binary(t):
        return pa.binary()
    if pa.types.is_large_list(t) or pa.types.is_list(t):
        return pa.list_(pa.field(t.value_field.name, _small_types(t.value_type), t.value_field.nullable))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _small_types(f.type), f.nullable) for f in t])
    return t


def _parquet_writer(sink: Any, schema: pa.Schema) -> pq.ParquetWriter:
    # min/max statistics only for flat columns (ids, labels, numbers): on long texts and nested
    # messages they bloat the footer and page index without helping any filter
    flat = [f.name for f in schema if not pa.types.is_nested(f.type)]
    kw: dict[str, Any] = {"compression": "zstd", "write_page_index": True, "write_statistics": flat or False}
    try:
        return pq.ParquetWriter(sink, schema, use_content_defined_chunking=True, **kw)
    except TypeError:  # pragma: no cover - pyarrow < 21
        return pq.ParquetWriter(sink, schema, **kw)


def row_groups(pf: pq.ParquetFile, schema: pa.Schema, rows_per_group: int) -> Iterator[pa.Table]:
    """The rows of ``pf`` in order, as tables of exactly ``rows_per_group`` rows (the last may be
    shorter); a group whose Arrow size passes ~64 MiB is cut into equal parts. Group boundaries
    depend only on the rows before them, so appending rows never moves an earlier boundary."""
    pending: list[pa.RecordBatch] = []
    n = 0

    def emit(t: pa.Table) -> Iterator[pa.Table]:
        parts = max(1, math.ceil(t.nbytes / ROW_GROUP_MAX_BYTES))
        step = math.ceil(t.num_rows / parts)
        for start in range(0, t.num_rows, step):
            yield t.slice(start, step)

    for b in pf.iter_batches(batch_size=rows_per_group):
        pending.append(b.cast(schema))
        n += b.num_rows
        while n >= rows_per_group:
            t = pa.Table.from_batches(pending, schema=schema)
            yield from emit(t.slice(0, rows_per_group))
            rest = t.slice(rows_per_group)
            pending, n = (rest.to_batches() if rest.num_rows else []), rest.num_rows
    if n:
        yield from emit(pa.Table.from_batches(pending, schema=schema))


def write_shards(
    src: Path, out_dir: Path, split: str, shard_bytes: int, row_group_rows: int, *, start: int = 0,
    schema: pa.Schema | None = None,
) -> list[dict[str, Any]]:
    """Cut ``src`` into shards of about ``shard_bytes``, written as ``.<split>-NNNNN.part``
    (numbered from ``start``); :func:`name_shards` gives them their final names.

    Row order is kept. Shards are filled greedily, row group by row group, until the bytes written
    reach ``shard_bytes``, so a shard's content depends only on the rows up to its end: after rows
    are appended, earlier shards are byte-identical (only their ``-of-`` count may change) and a
    re-push uploads just the new content. ``schema`` forces the Arrow schema (appends match the
    shards already written). Returns ``{"split", "path", "rows", "bytes", "row_groups",
    "columns"}`` per shard.
    """
    pf = pq.ParquetFile(src)
    if schema is None:
        schema = pa.schema([pa.field(f.name, _small_types(f.type), f.nullable) for f in pf.schema_arrow])
    parts: list[Path] = []
    writer: pq.ParquetWriter | None = None
    sink: Any = None
    groups = 0
    footer_per_group = 0.0  # learnt from the shards closed so far (depends only on earlier rows)

    def close() -> None:
        nonlocal writer, footer_per_group
        assert writer is not None
        body = sink.tell()
        writer.close()
        sink.close()
        footer_per_group = max(footer_per_group, (parts[-1].stat().st_size - body) / max(1, groups))
        writer = None

    for group in row_groups(pf, schema, row_group_rows):
        if writer is None:
            parts.append(out_dir / f".{split}-{start + len(parts):05d}.part")
            sink = pa.OSFile(str(parts[-1]), "wb")
            writer = _parquet_writer(sink, schema)
            groups = 0
        writer.write_table(group, row_group_size=group.num_rows)
        groups += 1
        if sink.tell() + footer_per_group * groups >= shard_bytes:
            close()
    if writer is not None:
        close()
    files: list[dict[str, Any]] = []
    for part in parts:
        md = pq.ParquetFile(part).metadata
        files.append({"split": split, "path": part, "rows": md.num_rows, "bytes": part.stat().st_size,
                      "row_groups": md.num_row_groups, "columns": list(schema.names)})
    return files


def empty_shard(out_dir: Path, split: str, schema: pa.Schema) -> dict[str, Any]:
    """One shard without rows: keeps the schema visible to loaders when a split is empty."""
    schema = pa.schema([pa.field(f.name, _small_types(f.type), f.nullable) for f in schema])
    path = out_dir / f".{split}-00000.part"
    with pa.OSFile(str(path), "wb") as sink:
        _parquet_writer(sink, schema).close()
    return {"split": split, "path": path, "rows": 0, "bytes": path.stat().st_size, "row_groups": 0, "columns": list(schema.names)}


def name_shards(files: list[dict[str, Any]], data_dir: Path) -> list[dict[str, Any]]:
    """Move each split's shards (in order) to ``<split>-NNNNN-of-NNNNN.parquet`` in ``data_dir``;
    ``path`` is the file written (a temp part, or a shard kept from the last run)."""
    out: list[dict[str, Any]] = []
    for split in dict.fromkeys(f["split"] for f in files):
        mine = [f for f in files if f["split"] == split]
        for i, f in enumerate(mine):
            dest = data_dir / f"{split}-{i:05d}-of-{len(mine):05d}.parquet"
            if f.get("keep"):
                _link_or_copy(f["path"], dest)
            else:
                Path(f["path"]).rename(dest)
            out.append({**{k: v for k, v in f.items() if k not in ("path", "keep")}, "file": f"data/{dest.name}", "kept": bool(f.get("keep"))})
    return out


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def output_location(recipe: Any, spec: Any) -> str:
    """The output's directory (absolute local path) or its fsspec URL."""
    if "://" in spec.path and not spec.path.startswith("file://"):
        return spec.path
    p = Path(spec.path.removeprefix("file://")).expanduser()
    return str(p if p.is_absolute() else (Path(recipe.base_dir) / p).resolve())


def rejects_paths(recipe: Any) -> list[str]:
    """The workdir's ``rejects/*.parquet`` of the last run (negatives for DPO, dropped verdicts)."""
    wd = recipe.workdir_path()
    if "://" in wd:
        return []
    d = Path(wd) / "rejects"
    return [str(p) for p in sorted(d.glob("*.parquet"))] if d.is_dir() else []


def _swap_in(tmp: Path, out: Path) -> None:
    prev: list[str] = []
    if (out / "output.json").exists():
        try:
            prev = list(json.loads((out / "output.json").read_text()).get("managed", []))
        except (ValueError, OSError):
            prev = []
    names = dict.fromkeys([*MANAGED, *prev, *(p.name for p in tmp.iterdir())])
    old = out / f".old-{uuid.uuid4().hex[:8]}"
    old.mkdir()
    try:
        for name in names:
            if "/" in name or name.startswith("."):
                continue
            if (out / name).exists():
                (out / name).rename(old / name)
            if (tmp / name).exists():
                (tmp / name).rename(out / name)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _copy_to_url(local: Path, url: str) -> None:
    """Replace the managed files at an fsspec URL with the freshly written ones."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    if fs.exists(f"{root}/data"):
        fs.rm(f"{root}/data", recursive=True)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            dest = f"{root}/{p.relative_to(local).as_posix()}"
            fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(p), dest)


def layout_digest(spec: Any, options: dict[str, Any], where: Any, schema: pl.Schema) -> str:
    """What decides the shards' bytes besides the rows: format, options, sizes, the rows' schema."""
    return digest_of(WRITER_VERSION, spec.format, {k: v for k, v in options.items() if k != "card"}, where,
                     spec.test_fraction, spec.row_group_rows, spec.shard_size_mb, [(n, str(t)) for n, t in schema.items()])


def _append_plan(out: Path, layout: str, parts: list[Any], shard_bytes: int) -> tuple[list[dict[str, Any]], list[Any]] | None:
    """Shards of the last write to keep, and the final parts still to write, or None (rewrite).

    Appending is possible when the last write had the same layout and its final parts are a
    prefix of this run's (rows were only added at the end), its shards are all still there, and
    no split has reached ``max(APPEND_MAX_SHARDS, 2 x what a fresh write would make)`` shards
    (then the output is rewritten compactly).
    """
    try:
        prev = json.loads((out / "output.json").read_text())
    except (OSError, ValueError):
        return None
    lay = prev.get("layout") or {}
    old = list(lay.get("parts") or [])
    if lay.get("digest") != layout or [p.digest for p in parts[: len(old)]] != old:
        return None
    kept: list[dict[str, Any]] = []
    for f in prev.get("files") or []:
        path = out / str(f.get("file"))
        if "columns" not in f or not path.is_file() or path.stat().st_size != f.get("bytes"):
            return None
        if f["rows"]:
            kept.append({**f, "path": path, "keep": True})
    if not kept:  # the last write had no rows: nothing to keep
        return None
    for split in dict.fromkeys(f["split"] for f in kept):
        mine = [f for f in kept if f["split"] == split]
        fresh = math.ceil(sum(f["bytes"] for f in mine) / max(1, shard_bytes))
        if len(mine) + 1 > max(APPEND_MAX_SHARDS, 2 * fresh):
            return None
    return kept, parts[len(old):]


def write_output(
    final: pl.LazyFrame, spec: Any, recipe: Any, stats: dict[str, Any] | None = None, parts: list[Any] | None = None,
) -> dict[str, Any]:
    """Write one ``outputs[i]`` entry; returns what was written (files, rows per split).

    ``parts`` (the frame parts ``final`` scans, in order) lets a rerun append: when the last
    write's parts are a prefix of them, its shards are kept byte for byte and only the rows of the
    new parts are formatted and written, as new shards (see :func:`_append_plan`).
    """

    options = dict(spec.options)
    card_opts = dict(options.pop("card", None) or {})
    where = options.pop("where", None)
    if spec.push is not None and spec.push.repo and "repo" not in card_opts:
        card_opts["repo"] = spec.push.repo
    rejects = rejects_paths(recipe)
    in_schema = final.collect_schema()
    curriculum = "curriculum_rank" in in_schema and option_bool(options, "curriculum_order", True)

    def selected(lf: pl.LazyFrame) -> pl.LazyFrame:
        if where:
            from tracepipe.stages._sql import parse_sql_expr

            lf = lf.filter(parse_sql_expr(str(where)).fill_null(False))
        if curriculum:  # `select: {curriculum: ...}` ranks rows (easy -> hard); trainers read in file order
            lf = lf.sort("curriculum_rank", maintain_order=True, nulls_last=True)
        return lf

    final = selected(final)
    location = output_location(recipe, spec)
    remote = "://" in location
    shard_bytes = int(spec.shard_size_mb * 2**20)
    layout = layout_digest(spec, options, where, in_schema)
    out = Path(tempfile.mkdtemp(prefix="tracepipe-out-")) if remote else Path(location)
    plan = None
    if parts is not None and not remote and not curriculum and is_row_local(spec.format):
        plan = _append_plan(out, layout, parts, shard_bytes)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-{uuid.uuid4().hex[:8]}"
    secret_names = recipe_secret_env_names(recipe)
    try:
        files: list[dict[str, Any]] | None = None
        if plan is not None:
            kept, new_parts = plan
            # the new parts under the schema of all final rows (formats look at the columns)
            new_rows = selected(pl.concat([pl.LazyFrame(schema=in_schema), scan_parts(new_parts)], how="diagonal_relaxed")) if new_parts else None
            try:
                (tmp / "data").mkdir(parents=True)
                files = _write_data(new_rows, spec, options, rejects, tmp, shard_bytes, kept)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
                log.info("output %s: appending failed (%s); rewriting it", spec.path, e)
                files = None
        if files is None:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "data").mkdir(parents=True)
            files = _write_data(final, spec, options, rejects, tmp, shard_bytes, [])
        splits = list(dict.fromkeys(f["split"] for f in files))

        summary = _card.summarize(final, spec, recipe, stats, files, rejects)
        plots = _card.write_plots(summary, tmp)
        recipe_text = scrub(Path(recipe.path).read_text(), secret_names) if recipe.path is not None else None
        if recipe_text is not None:
            (tmp / "recipe.yaml").write_text(recipe_text)
        first_shard = tmp / files[0]["file"]
        features = _card.hf_features(pq.read_schema(first_shard))
        card = _card.render_card(summary, recipe_text, card_opts, features, plots, secret_names)
        (tmp / "README.md").write_text(card)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        if stats is not None:
            (tmp / "stats.json").write_text(json.dumps(scrub_obj(stats, secret_names), indent=2, default=str))
        if spec.format == "sharegpt":
            from tracepipe.outputs.sharegpt import llamafactory_info

            info_entry = llamafactory_info(recipe.name, [f["file"] for f in files if f["split"] == "train"], options)
            (tmp / "dataset_info.json").write_text(json.dumps(info_entry, indent=2))
        info = {
            "format": spec.format,
            "path": location,
            "files": [{k: f[k] for k in ("split", "file", "rows", "bytes", "row_groups", "columns")} for f in files],
            "rows": {s: sum(f["rows"] for f in files if f["split"] == s) for s in splits},
            "appended": any(f.get("kept") for f in files),
            "managed": sorted(p.name for p in tmp.iterdir()) + ["output.json"],
        }
        if parts is not None:
            info["layout"] = {"digest": layout, "parts": [p.digest for p in parts]}
        (tmp / "output.json").write_text(json.dumps(info, indent=2))
        _swap_in(tmp, out)
        if remote:
            _copy_to_url(out, location)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if remote:
            shutil.rmtree(out, ignore_errors=True)
    if spec.push is not None and not os.environ.get("TRACEPIPE_NO_PUSH"):
        info["push"] = _push_after_write(recipe, spec)
    return info


def _write_data(
    src: pl.LazyFrame | None, spec: Any, options: dict[str, Any], rejects: list[str], tmp: Path, shard_bytes: int,
    kept: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Format ``src`` (None: nothing new), write its shards after the ``kept`` ones, name them all
    under ``tmp/data``. Returns the shards in split order (train first)."""
    data = tmp / "data"
    new: list[dict[str, Any]] = []
    splits = list(dict.fromkeys(["train", *(f["split"] for f in kept)]))
    empty_schema: pa.Schema | None = None
    if src is not None:
        rows = get_format(spec.format)(src, {**options, "_rejects": rejects})
        schema = rows.collect_schema()
        if spec.test_fraction > 0:
            if "id" not in schema:
                raise ValueError(f"outputs[].test_fraction needs an `id` column in the {spec.format} rows")
            rows = rows.with_columns(split_expr(spec.test_fraction).alias(SPLIT_COL))
            schema = rows.collect_schema()
        drop_id = not option_bool(options, "meta", True) and "id" in schema and "id" not in (options.get("keep_columns") or [])
        staged = tmp / "staged.parquet"
        rows.sink_parquet(staged, compression="lz4", maintain_order=True)  # scratch: fast codec
        present = ["train"]
        if SPLIT_COL in schema:
            present = list(pl.scan_parquet(staged).select(pl.col(SPLIT_COL).unique()).collect().to_series().to_list())
        splits = list(dict.fromkeys([*splits, *(["test"] if "test" in present else [])]))
        for split in splits:
            mine = [f for f in kept if f["split"] == split]
            force = pq.read_schema(mine[0]["path"]) if mine else None
            if SPLIT_COL not in schema and not drop_id:  # one split, nothing to drop: shard the staged rows
                new += write_shards(staged, data, split, shard_bytes, spec.row_group_rows, start=len(mine), schema=force)
                continue
            part = pl.scan_parquet(staged)
            if SPLIT_COL in schema:
                part = part.filter(pl.col(SPLIT_COL) == split).drop(SPLIT_COL)
            if drop_id:
                part = part.drop("id")
            split_file = tmp / f"staged-{split}.parquet"
            part.sink_parquet(split_file, compression="lz4", maintain_order=True)
            new += write_shards(split_file, data, split, shard_bytes, spec.row_group_rows, start=len(mine), schema=force)
            if empty_schema is None:
                empty_schema = pq.read_schema(split_file)
            split_file.unlink()
        if empty_schema is None:
            empty_schema = pq.read_schema(staged)
        staged.unlink()
    files: list[dict[str, Any]] = []
    for split in splits:
        mine = [f for f in kept if f["split"] == split] + [f for f in new if f["split"] == split]
        if not mine:
            if split != "train":
                continue
            if empty_schema is None:  # pragma: no cover - kept shards always include train ones
                raise ValueError("no rows and no schema to write an empty shard with")
            mine = [empty_shard(data, split, empty_schema)]
        files += mine
    return name_shards(files, data)


def _push_after_write(recipe: Any, spec: Any) -> list[str]:
    """Push right after writing (``outputs[].push``); a failed push fails the run, token-free."""
    from tracepipe.hub import push_output
    from tracepipe.pipeline.runner import RunFailed

    try:
        return list(push_output(recipe, spec))
    except Exception as e:
        raise RunFailed(f"push of output {spec.path!r} failed: {scrub(f'{type(e).__name__}: {e}', recipe_secret_env_names(recipe))}") from None
