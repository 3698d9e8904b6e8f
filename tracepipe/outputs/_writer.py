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
(at most ~64 MiB uncompressed per group), so streaming readers (``datasets`` streaming, the Hub
viewer) fetch small pieces. Shards are written with content-defined chunking and a page index:
the same rows give byte-identical files, so a re-push uploads only shards that changed.

Everything is written into a temporary directory next to the output and swapped in at the end
(readers see the old set or the new one). ``path`` may be an fsspec URL: the files are built
locally and copied there. With ``push:`` set, the output is pushed after it is written
(``TRACEPIPE_NO_PUSH=1`` skips that; ``tracepipe push`` pushes later).

Options every format understands: ``where`` (SQL filter over the final rows before formatting)
and ``card`` (``license``, ``language``, ``task_categories``, ``tags``, ``pretty_name``, ``text``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
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


def _row_group_rows(pf: pq.ParquetFile, requested: int) -> int:
    """``requested``, lowered so one row group stays under ~64 MiB uncompressed."""
    md = pf.metadata
    if md.num_rows == 0 or md.num_row_groups == 0:
        return requested
    raw = sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups))
    per_row = max(1.0, raw / md.num_rows)
    return max(1, min(requested, int(ROW_GROUP_MAX_BYTES // per_row)))


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


def _parquet_writer(path: Path, schema: pa.Schema) -> pq.ParquetWriter:
    kw: dict[str, Any] = {"compression": "zstd", "write_page_index": True}
    try:
        return pq.ParquetWriter(path, schema, use_content_defined_chunking=True, **kw)
    except TypeError:  # pragma: no cover - pyarrow < 21
        return pq.ParquetWriter(path, schema, **kw)


def write_shards(src: Path, out_dir: Path, split: str, shard_bytes: int, row_group_rows: int) -> list[dict[str, Any]]:
    """Cut ``src`` into ``<split>-NNNNN-of-NNNNN.parquet`` shards of about ``shard_bytes``.

    Row order is kept; every row group but the last of a shard holds exactly the same number of
    rows. Returns ``{"split", "file", "rows", "bytes", "row_groups", "columns"}`` per shard.
    """
    pf = pq.ParquetFile(src)
    rows = pf.metadata.num_rows
    size = src.stat().st_size
    n_shards = max(1, math.ceil(size / max(1, shard_bytes))) if rows else 1
    per_shard = max(1, math.ceil(rows / n_shards)) if rows else 0
    n_shards = max(1, math.ceil(rows / per_shard)) if rows else 1  # every shard non-empty
    rg = _row_group_rows(pf, row_group_rows)
    schema = pa.schema([pa.field(f.name, _small_types(f.type), f.nullable) for f in pf.schema_arrow])
    files: list[dict[str, Any]] = []

    def shard_path(i: int) -> Path:
        return out_dir / f"{split}-{i:05d}-of-{n_shards:05d}.parquet"

    if rows == 0:
        _parquet_writer(shard_path(0), schema).close()
    else:
        batches = pf.iter_batches(batch_size=rg)
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        for i in range(n_shards):
            want = min(per_shard, rows - i * per_shard)
            writer = _parquet_writer(shard_path(i), schema)
            written = 0
            while written < want:
                take = min(rg, want - written)
                while pending_rows < take:
                    b = next(batches).cast(schema)
                    pending.append(b)
                    pending_rows += b.num_rows
                table = pa.Table.from_batches(pending, schema=schema)
                writer.write_table(table.slice(0, take), row_group_size=take)
                rest = table.slice(take)
                pending = rest.to_batches() if rest.num_rows else []
                pending_rows = rest.num_rows
                written += take
            writer.close()
    for i in range(n_shards):
        p = shard_path(i)
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
        rows.sink_parquet(staged, compression="zstd", maintain_order=True)
        splits = ["train"]
        if SPLIT_COL in schema:
            present = set(pl.scan_parquet(staged).select(pl.col(SPLIT_COL).unique()).collect().to_series().to_list())
            splits = ["train"] + (["test"] if "test" in present else [])
        files: list[dict[str, Any]] = []
        for split in splits:
            part = pl.scan_parquet(staged)
            if SPLIT_COL in schema:
                part = part.filter(pl.col(SPLIT_COL) == split).drop(SPLIT_COL)
            if drop_id:
                part = part.drop("id")
            split_file = tmp / f"staged-{split}.parquet"
            part.sink_parquet(split_file, compression="zstd", maintain_order=True)
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

            info_entry = llamafactory_info(recipe.name, [f["file"] for f in files if f["split"] == "train"])
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
