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
import pyarrow.parquet as pq
import xxhash

from tracepipe.outputs import get_format
from tracepipe.outputs._common import option_bool
from tracepipe.outputs._secrets import recipe_secret_env_names, scrub, scrub_obj

SPLIT_COL = "__split"
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


def write_shards(src: Path, out_dir: Path, split: str, shard_bytes: int, row_group_rows: int) -> list[dict[str, Any]]:
    """Cut ``src`` into ``<split>-NNNNN-of-NNNNN.parquet`` shards of about ``shard_bytes``.

    Row order is kept. Shards are filled greedily, row group by row group, until the bytes written
    reach ``shard_bytes``, so a shard's content depends only on the rows up to its end: after rows
    are appended, earlier shards are byte-identical (only their ``-of-`` count may change) and a
    re-push uploads just the new content. Returns ``{"split", "file", "rows", "bytes",
    "row_groups", "columns"}`` per shard.
    """
    pf = pq.ParquetFile(src)
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
            parts.append(out_dir / f".{split}-{len(parts):05d}.part")
            sink = pa.OSFile(str(parts[-1]), "wb")
            writer = _parquet_writer(sink, schema)
            groups = 0
        writer.write_table(group, row_group_size=group.num_rows)
        groups += 1
        if sink.tell() + footer_per_group * groups >= shard_bytes:
            close()
    if writer is not None:
        close()
    if not parts:  # no rows: one empty shard keeps the schema visible to loaders
        parts.append(out_dir / f".{split}-00000.part")
        with pa.OSFile(str(parts[0]), "wb") as empty:
            _parquet_writer(empty, schema).close()
    files: list[dict[str, Any]] = []
    for i, part in enumerate(parts):
        p = out_dir / f"{split}-{i:05d}-of-{len(parts):05d}.parquet"
        part.rename(p)
        md = pq.ParquetFile(p).metadata
        files.append({"split": split, "file": f"data/{p.name}", "rows": md.num_rows, "bytes": p.stat().st_size,
                      "row_groups": md.num_row_groups, "columns": list(schema.names)})
    return files


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


def write_output(final: pl.LazyFrame, spec: Any, recipe: Any, stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write one ``outputs[i]`` entry; returns what was written (files, rows per split)."""
    from tracepipe.outputs import _card

    options = dict(spec.options)
    card_opts = dict(options.pop("card", None) or {})
    where = options.pop("where", None)
    if spec.push is not None and spec.push.repo and "repo" not in card_opts:
        card_opts["repo"] = spec.push.repo
    rejects = rejects_paths(recipe)
    if where:
        from tracepipe.stages._sql import parse_sql_expr

        final = final.filter(parse_sql_expr(str(where)).fill_null(False))
    if "curriculum_rank" in final.collect_schema() and option_bool(options, "curriculum_order", True):
        # `select: {curriculum: ...}` ranks rows (easy -> hard, or named stages); trainers read in file order
        final = final.sort("curriculum_rank", maintain_order=True, nulls_last=True)
    rows = get_format(spec.format)(final, {**options, "_rejects": rejects})
    schema = rows.collect_schema()
    if spec.test_fraction > 0:
        if "id" not in schema:
            raise ValueError(f"outputs[].test_fraction needs an `id` column in the {spec.format} rows")
        rows = rows.with_columns(split_expr(spec.test_fraction).alias(SPLIT_COL))
        schema = rows.collect_schema()
    drop_id = not option_bool(options, "meta", True) and "id" in schema and "id" not in (options.get("keep_columns") or [])

    location = output_location(recipe, spec)
    remote = "://" in location
    out = Path(tempfile.mkdtemp(prefix="tracepipe-out-")) if remote else Path(location)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-{uuid.uuid4().hex[:8]}"
    (tmp / "data").mkdir(parents=True)
    secret_names = recipe_secret_env_names(recipe)
    try:
        staged = tmp / "staged.parquet"
        rows.sink_parquet(staged, compression="lz4", maintain_order=True)  # scratch: fast codec
        splits = ["train"]
        if SPLIT_COL in schema:
            present = set(pl.scan_parquet(staged).select(pl.col(SPLIT_COL).unique()).collect().to_series().to_list())
            splits = ["train"] + (["test"] if "test" in present else [])
        files: list[dict[str, Any]] = []
        for split in splits:
            if SPLIT_COL not in schema and not drop_id:  # one split, nothing to drop: shard the staged rows
                files += write_shards(staged, tmp / "data", split, int(spec.shard_size_mb * 2**20), spec.row_group_rows)
                continue
            part = pl.scan_parquet(staged)
            if SPLIT_COL in schema:
                part = part.filter(pl.col(SPLIT_COL) == split).drop(SPLIT_COL)
            if drop_id:
                part = part.drop("id")
            split_file = tmp / f"staged-{split}.parquet"
            part.sink_parquet(split_file, compression="lz4", maintain_order=True)
            files += write_shards(split_file, tmp / "data", split, int(spec.shard_size_mb * 2**20), spec.row_group_rows)
            split_file.unlink()
        staged.unlink()

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
            "files": [{k: f[k] for k in ("split", "file", "rows", "bytes", "row_groups")} for f in files],
            "rows": {s: sum(f["rows"] for f in files if f["split"] == s) for s in splits},
            "managed": sorted(p.name for p in tmp.iterdir()) + ["output.json"],
        }
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


def _push_after_write(recipe: Any, spec: Any) -> list[str]:
    """Push right after writing (``outputs[].push``); a failed push fails the run, token-free."""
    from tracepipe.hub import push_output
    from tracepipe.pipeline.runner import RunFailed

    try:
        return list(push_output(recipe, spec))
    except Exception as e:
        raise RunFailed(f"push of output {spec.path!r} failed: {scrub(f'{type(e).__name__}: {e}', recipe_secret_env_names(recipe))}") from None
