"""Shard writer: splits, size-bounded zstd Parquet shards in deterministic order, card, atomic swap.

One ``outputs[i]`` entry becomes, under its ``path``::

    data/<split>-00000-of-000NN.parquet   zstd shards of about ``shard_size_mb``, in row order
    README.md                             dataset card (data_cards/ template, YAML front matter)
    token_lengths.png, difficulty.png     plots the card shows
    recipe.yaml                           the recipe (secrets scrubbed)
    summary.json                          the card's numbers (the report reads them)
    stats.json, output.json               run stats and what was written (local bookkeeping)
    dataset_info.json                     sharegpt only: the LLaMA-Factory entry
    browser.html                          the trace browser over the output's rows (option ``browser``)

Row-local formats are applied one frame part at a time and streamed into the shards (memory holds
a part); formats that pair rows, and curriculum order, go through one staged scratch file. An
appending rerun (the last write's parts are a prefix of this run's, same layout) keeps the old
shards byte for byte and writes only the new rows, as new shards (:func:`_append_plan`). Row groups hold ``row_group_rows`` rows, fewer when rows are wide
(at most ~64 MiB of Arrow data per group), so streaming readers (``datasets`` streaming, the Hub
viewer) fetch small pieces. Shards fill up greedily to ``shard_size_mb`` in row order and are
written with content-defined chunking and a page index: the same rows give byte-identical files,
and appending rows leaves earlier shards' bytes unchanged, so a re-push uploads only new content.

Everything is written into a temporary directory next to the output and swapped in at the end
(readers see the old set or the new one). ``path`` may be an fsspec URL: the files are built
locally and copied there. The writer never pushes: :func:`tracepipe.publish.publish` writes each
output, then pushes it when ``push:`` is set (``TRACEPIPE_NO_PUSH=1`` skips that; ``tracepipe push``
pushes later). Every text file written here passes through one
:class:`~tracepipe.secrets.Scrubber` (the caller's, else one made for the recipe).

Options every format understands: ``where`` (SQL filter over the final rows before formatting),
``curriculum_order`` (default true: rows ranked by ``select: {curriculum: ...}`` are written in
``curriculum_rank`` order), ``card`` (``license``, ``language``, ``task_categories``, ``tags``, ``pretty_name``, ``text``)
and ``browser`` (default true: ``browser.html``, a self-contained trace browser, pushed with the
shards; false: none; ``{rows, mb, tokens, rejects}``: its bounds, and the workdir's rejects too).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - RecordBatch.cast needs it; loaded here, not inside a write
import pyarrow.parquet as pq
import xxhash

from tracepipe import _browser
from tracepipe.locations import output_location, rejects_paths  # noqa: F401 - re-exported
from tracepipe.outputs import _card, get_format, is_row_local
from tracepipe.outputs._common import option_bool
from tracepipe.pipeline.frames import digest_of, frame_schema, scan_parts
from tracepipe.secrets import Scrubber

log = logging.getLogger(__name__)

SPLIT_COL = "__split"
WRITER_VERSION = "2"
#: an appending rerun adds shards; a split with this many (or twice what a fresh write would
#: make, if more) is rewritten compactly instead
APPEND_MAX_SHARDS = 8
ROW_GROUP_MAX_BYTES = 64 * 2**20
#: top-level names the writer owns in an output directory (others are left alone)
MANAGED = ("data", "README.md", "recipe.yaml", "stats.json", "output.json", "summary.json",
           "dataset_info.json", "token_lengths.png", "difficulty.png", "browser.html")


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


class ShardWriter:
    """Streams tables (in row order) into ``.<split>-NNNNN.part`` shards of about ``shard_bytes``.

    Rows are grouped into row groups of exactly ``row_group_rows`` rows (the last may be shorter;
    a group whose Arrow size passes ~64 MiB is cut into equal parts), and shards fill up greedily,
    row group by row group, until the bytes written reach ``shard_bytes``. Group and shard
    boundaries depend only on the rows before them, so after rows are appended, earlier shards
    are byte-identical (only their ``-of-`` count may change) and a re-push uploads just the new
    content. Memory holds one row group. ``schema`` forces the Arrow schema (an append matches
    the shards already written); else it is the first table's, with 32-bit offsets.
    :func:`name_shards` gives the shards their final names.
    """

    def __init__(self, out_dir: Path, split: str, shard_bytes: int, row_group_rows: int, *, start: int = 0,
                 schema: pa.Schema | None = None) -> None:
        self.out_dir, self.split, self.shard_bytes, self.rows_per_group = out_dir, split, shard_bytes, row_group_rows
        self.start = start
        self.schema = schema
        self.paths: list[Path] = []
        self._pending: list[pa.RecordBatch] = []
        self._n = 0
        self._writer: pq.ParquetWriter | None = None
        self._sink: Any = None
        self._groups = 0
        self._footer_per_group = 0.0  # learnt from the shards closed so far (depends only on earlier rows)

    def write(self, data: pa.Table | pa.RecordBatch) -> None:
        if self.schema is None:
            self.schema = pa.schema([pa.field(f.name, _small_types(f.type), f.nullable) for f in data.schema])
        batches = data.to_batches() if isinstance(data, pa.Table) else [data]
        for b in batches:
            if b.num_rows:
                self._pending.append(b.cast(self.schema))
                self._n += b.num_rows
        while self._n >= self.rows_per_group:
            t = pa.Table.from_batches(self._pending, schema=self.schema)
            self._emit(t.slice(0, self.rows_per_group))
            rest = t.slice(self.rows_per_group)
            self._pending, self._n = (rest.to_batches() if rest.num_rows else []), rest.num_rows

    def _emit(self, t: pa.Table) -> None:
        assert self.schema is not None
        parts = max(1, math.ceil(t.nbytes / ROW_GROUP_MAX_BYTES))
        step = math.ceil(t.num_rows / parts)
        for first in range(0, t.num_rows, step):
            group = t.slice(first, step)
            if self._writer is None:
                self.paths.append(self.out_dir / f".{self.split}-{self.start + len(self.paths):05d}.part")
                self._sink = pa.OSFile(str(self.paths[-1]), "wb")
                self._writer = _parquet_writer(self._sink, self.schema)
                self._groups = 0
            self._writer.write_table(group, row_group_size=group.num_rows)
            self._groups += 1
            if self._sink.tell() + self._footer_per_group * self._groups >= self.shard_bytes:
                self._close_shard()

    def _close_shard(self) -> None:
        assert self._writer is not None
        body = self._sink.tell()
        self._writer.close()
        self._sink.close()
        self._footer_per_group = max(self._footer_per_group, (self.paths[-1].stat().st_size - body) / max(1, self._groups))
        self._writer = None

    def close(self) -> list[dict[str, Any]]:
        """Flush; returns ``{"split", "path", "rows", "bytes", "row_groups", "columns"}`` per shard."""
        if self._n:
            self._emit(pa.Table.from_batches(self._pending, schema=self.schema))
            self._pending, self._n = [], 0
        if self._writer is not None:
            self._close_shard()
        files: list[dict[str, Any]] = []
        for path in self.paths:
            md = pq.read_metadata(path)
            files.append({"split": self.split, "path": path, "rows": md.num_rows, "bytes": path.stat().st_size,
                          "row_groups": md.num_row_groups, "columns": list(md.schema.to_arrow_schema().names)})
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


def _previous(out: Path) -> dict[str, Any]:
    """The last write's ``output.json`` (empty when there is none, or it cannot be read)."""
    try:
        return dict(json.loads((out / "output.json").read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def part_figures(
    parts: list[Any], where: Any, prev: dict[str, Any], schema: pl.Schema,
) -> dict[str, Any]:
    """The card's whole-output figures that add up over parts: rows (after ``where``) and domains.

    They are kept per final part in ``output.json`` (``figures``), so a rerun reads only the parts
    the last write did not see, instead of scanning every final row again.
    """
    key = digest_of(WRITER_VERSION, "figures", where)
    old = prev.get("figures") or {}
    known: dict[str, Any] = dict(old.get("parts") or {}) if old.get("key") == key else {}
    todo = [p for p in parts if p.digest not in known]
    if todo:
        # under the schema of all final rows, as the shards are written (``where`` may name a
        # column that only some parts have)
        lf = pl.concat([pl.LazyFrame(schema={**schema, "_file": pl.String}), scan_parts(todo, file_column="_file")],
                       how="diagonal_relaxed")
        if where:
            from tracepipe.stages._sql import parse_sql_expr

            lf = lf.filter(parse_sql_expr(str(where)).fill_null(False))
        agg = [pl.len().alias("rows")]
        if "domain" in lf.collect_schema():
            agg.append(pl.col("domain").drop_nulls().cast(pl.String).unique().sort().alias("domains"))
        got = {r["_file"]: r for r in lf.group_by("_file").agg(agg).collect().iter_rows(named=True)}
        for p in todo:
            r = got.get(str(p.path)) or {}
            known[p.digest] = {"rows": int(r.get("rows") or 0), "domains": list(r.get("domains") or [])}
    return {"key": key, "parts": {p.digest: known[p.digest] for p in parts}}


def _append_plan(prev: dict[str, Any], out: Path, layout: str, parts: list[Any], shard_bytes: int) -> tuple[list[dict[str, Any]], list[Any]] | None:
    """Shards of the last write to keep, and the final parts still to write, or None (rewrite).

    Appending is possible when the last write had the same layout and its final parts are a
    prefix of this run's (rows were only added at the end), its shards are all still there, and
    no split has reached ``max(APPEND_MAX_SHARDS, 2 x what a fresh write would make)`` shards
    (then the output is rewritten compactly).
    """
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
    scrubber: Scrubber | None = None,
) -> dict[str, Any]:
    """Write one ``outputs[i]`` entry; returns what was written (files, rows per split). Never pushes.

    ``parts`` (the frame parts ``final`` scans, in order) lets a rerun append: when the last
    write's parts are a prefix of them, its shards are kept byte for byte and only the rows of the
    new parts are formatted and written, as new shards (see :func:`_append_plan`).
    ``scrubber`` masks secrets in every text file written (default: one made for ``recipe``).
    """
    options = dict(spec.options)
    card_opts = dict(options.pop("card", None) or {})
    where = options.pop("where", None)
    browser = options.pop("browser", True)  # the trace browser page: not part of the shards' layout
    if spec.push is not None and spec.push.repo and "repo" not in card_opts:
        card_opts["repo"] = spec.push.repo
    rejects = rejects_paths(recipe)
    in_schema = frame_schema(parts) if parts else final.collect_schema()
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
    # formats that pair rows, and curriculum order, are written from all final rows at once;
    # row-local ones a part at a time, and they can append to the last write
    whole = curriculum or parts is None or not is_row_local(spec.format)
    prev = _previous(out) if not remote else {}
    plan = _append_plan(prev, out, layout, parts, shard_bytes) if parts is not None and not whole and not remote else None
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-{uuid.uuid4().hex[:8]}"
    scrubber = scrubber or Scrubber.for_recipe(recipe)
    try:
        files: list[dict[str, Any]] | None = None

        def part_chunks(ps: list[Any]) -> list[pl.LazyFrame]:
            # each part under the schema of all final rows (formats look at the columns)
            return [selected(pl.concat([pl.LazyFrame(schema=in_schema), scan_parts([p])], how="diagonal_relaxed")) for p in ps]

        if plan is not None:
            kept, new_parts = plan
            try:
                (tmp / "data").mkdir(parents=True)
                files = _write_data(part_chunks(new_parts), spec, options, rejects, tmp, shard_bytes, kept, whole=False)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
                log.info("output %s: appending failed (%s); rewriting it", spec.path, e)
                files = None
        if files is None:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "data").mkdir(parents=True)
            chunks = [final] if whole or parts is None else part_chunks(parts)
            files = _write_data(chunks, spec, options, rejects, tmp, shard_bytes, [], whole=whole)
        splits = list(dict.fromkeys(f["split"] for f in files))

        figures = part_figures(parts, where, prev, in_schema) if parts else None
        known = None
        if figures is not None:
            per_part = list(figures["parts"].values())
            known = {"final_rows": sum(f["rows"] for f in per_part), "domains": sorted({d for f in per_part for d in f["domains"]})}
        summary = scrubber.obj(_card.summarize(final, spec, recipe, stats, files, rejects, known=known, schema=in_schema))
        plots = _card.write_plots(summary, tmp)
        recipe_text = scrubber.text(Path(recipe.path).read_text()) if recipe.path is not None else None
        if recipe_text is not None:
            (tmp / "recipe.yaml").write_text(recipe_text)
        first_shard = tmp / files[0]["file"]
        features = _card.hf_features(pq.read_schema(first_shard))
        card = scrubber.text(_card.render_card(summary, recipe_text, card_opts, features, plots))
        (tmp / "README.md").write_text(card)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        pairs = sorted((tmp / "data").glob("*.parquet")) if spec.format == "dpo-pairs" else []
        page = _browser.output_page(final, spec, recipe, pairs, browser, split_expr(spec.test_fraction))
        if page is not None:
            (tmp / "browser.html").write_text(scrubber.text(page))
        if stats is not None:
            (tmp / "stats.json").write_text(json.dumps(scrubber.obj(stats), indent=2, default=str))
        if spec.format == "sharegpt":
            from tracepipe.outputs.sharegpt import llamafactory_info

            info_entry = llamafactory_info(recipe.name, [f["file"] for f in files if f["split"] == "train"], options)
            (tmp / "dataset_info.json").write_text(json.dumps(info_entry, indent=2))
        info = {
            "format": spec.format,
            "path": location,
            "files": [{k: f[k] for k in ("split", "file", "rows", "bytes", "row_groups", "columns")} for f in files],
            "rows": {s: sum(f["rows"] for f in files if f["split"] == s) for s in splits},
            # the last write's shards were kept byte for byte; new rows (if any) went to new shards
            "appended": any(f.get("kept") for f in files),
            "shards_kept": sum(1 for f in files if f.get("kept")),
            "shards_written": sum(1 for f in files if not f.get("kept")),
            "managed": sorted(p.name for p in tmp.iterdir()) + ["output.json"],
        }
        if parts is not None:
            info["layout"] = {"digest": layout, "parts": [p.digest for p in parts]}
        if figures is not None:
            info["figures"] = figures
        (tmp / "output.json").write_text(json.dumps(info, indent=2))
        _swap_in(tmp, out)
        if remote:
            _copy_to_url(out, location)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if remote:
            shutil.rmtree(out, ignore_errors=True)
    return info


def _write_data(
    chunks: list[pl.LazyFrame], spec: Any, options: dict[str, Any], rejects: list[str], tmp: Path, shard_bytes: int,
    kept: list[dict[str, Any]], whole: bool,
) -> list[dict[str, Any]]:
    """Format the rows of ``chunks`` (in order), stream them into shards after the ``kept`` ones,
    and name them all under ``tmp/data``. Returns the shards in split order (train first).

    Row-local formats get one chunk per frame part, each formatted and written on its own, so
    memory holds a part. A ``whole`` format (pairs across rows, curriculum order) gets one chunk,
    staged to a scratch file and read back in row groups.
    """
    data = tmp / "data"
    writers: dict[str, ShardWriter] = {}
    empty_schema: pa.Schema | None = None

    def route(df: pl.DataFrame) -> None:
        groups = df.partition_by(SPLIT_COL, as_dict=True, include_key=False, maintain_order=True) if SPLIT_COL in df.columns else {("train",): df}
        for (split, *_), sub in groups.items():
            if split not in writers:
                mine = [f for f in kept if f["split"] == split]
                writers[split] = ShardWriter(data, str(split), shard_bytes, spec.row_group_rows, start=len(mine),
                                             schema=pq.read_schema(mine[0]["path"]) if mine else None)
            writers[split].write(sub.to_arrow())

    for lf in chunks:
        rows = get_format(spec.format)(lf, {**options, "_rejects": rejects})
        schema = rows.collect_schema()
        if spec.test_fraction > 0:
            if "id" not in schema:
                raise ValueError(f"outputs[].test_fraction needs an `id` column in the {spec.format} rows")
            rows = rows.with_columns(split_expr(spec.test_fraction).alias(SPLIT_COL))
        if not option_bool(options, "meta", True) and "id" in schema and "id" not in (options.get("keep_columns") or []):
            rows = rows.drop("id")  # kept for the split by id; not wanted in the shards
        if empty_schema is None:
            empty_schema = pl.DataFrame(schema=rows.drop(SPLIT_COL, strict=False).collect_schema()).to_arrow().schema
        if not whole:
            route(rows.collect())
            continue
        staged = tmp / "staged.parquet"
        rows.sink_parquet(staged, compression="lz4", maintain_order=True)  # scratch: fast codec
        for batch in pq.ParquetFile(staged).iter_batches(batch_size=max(1, spec.row_group_rows), use_threads=False):
            route(pl.DataFrame(pl.from_arrow(batch)))
        staged.unlink()
    new = [f for w in writers.values() for f in w.close()]
    files: list[dict[str, Any]] = []
    for split in dict.fromkeys(["train", *(f["split"] for f in kept), *(["test"] if "test" in writers else [])]):
        mine = [f for f in kept if f["split"] == split] + [f for f in new if f["split"] == split]
        if not mine:
            if split != "train":
                continue
            if empty_schema is None:  # pragma: no cover - kept shards always include train ones
                raise ValueError("no rows and no schema to write an empty shard with")
            mine = [empty_shard(data, split, empty_schema)]
        files += mine
    return name_shards(files, data)

