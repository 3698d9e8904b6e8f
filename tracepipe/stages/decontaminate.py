"""``decontaminate``: drop rows that overlap evaluation benchmarks (a row stage).

Input columns: ``field`` (default ``problem``); with ``embedding_threshold`` also the vector
column ``embedding`` when the rows have it (from the ``embed`` stage; otherwise the stage embeds
``field`` itself with ``model``). Output columns: ``contam_benchmark``, ``contam_id``,
``contam_method`` (``ngram`` | ``embedding``), ``contam_score``; rejected rows carry reason
``decontaminate:ngram`` or ``decontaminate:embedding`` (``drop: false`` only flags them).

Benchmarks: the shipped ``math500``, ``aime24``, ``amc23``, ``gsm8k_test``, ``humaneval`` (by
name; default: all) and user files ``{path: ..., field: ..., id: ..., name: ...}``.

Matching:
- **n-gram**: texts are normalized (lower-case, LaTeX spacing / ``$ { }`` / sentence
  punctuation dropped, ``\\dfrac`` -> ``\\frac``; numbers kept) and split into words, numbers,
  LaTeX commands and math symbols. A row matches a benchmark item when it contains at least one
  of the item's ``ngram``-token n-grams (default 13) and at least ``min_overlap`` of them
  (``contam_score`` = that share). Items shorter than ``ngram`` tokens are matched whole (n
  lowered to their length), down to ``min_ngram`` tokens.
- **embedding** (optional): cosine similarity to the nearest benchmark item >= the threshold,
  benchmarks embedded with the same model (cached under ``<workdir>/cache``).

Why a row stage: the decision for a row depends only on its text and the benchmark set (whose
content hash is in the fingerprint), so results are cached per row and adding problems checks
only the new ones; editing a benchmark file or a parameter re-checks everything.

Example: ``- decontaminate: {benchmarks: [math500, aime24, amc23, gsm8k_test], ngram: 13}``
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import polars as pl
from pydantic import Field, field_validator

from tracepipe.benchmarks_data import (
    BenchmarkFile,
    benchmarks_digest,
    check_name,
    known_benchmarks,
    load_benchmarks,
)
from tracepipe.contract import DROP_COL, IN_KEY_COL
from tracepipe.stages import register
from tracepipe.stages.base import ExecField, RowStage, StageParams

OUT_COLS = ("contam_benchmark", "contam_id", "contam_method", "contam_score")


class DecontaminateParams(StageParams):
    benchmarks: list[str | BenchmarkFile] = Field(
        default_factory=known_benchmarks, description="shipped names and/or {path, field, id?, name?}")
    field: str = Field("problem", description="text column checked")
    ngram: int = Field(13, ge=3, description="tokens per n-gram")
    min_ngram: int = Field(3, ge=1, description="benchmark items shorter than `ngram` are matched whole down to this many tokens")
    min_overlap: float = Field(0.0, ge=0, le=1, description="share of a benchmark item's n-grams that must occur (0: any one)")
    embedding_threshold: float | None = Field(None, gt=0, le=1, description="also flag rows whose cosine to a benchmark item is at least this")
    embedding: str = Field("embedding", description="vector column to use when present (from `embed`)")
    model: str = Field("default", description="embedding model (must be the one `embed` used)")
    drop: bool = Field(True, description="drop matching rows (false: only fill the contam_* columns)")
    batch_size: int = ExecField(2048, ge=1, description="rows per batch")
    encode_batch_size: int = ExecField(64, ge=1, description="texts per forward pass when embedding")

    @field_validator("benchmarks")
    @classmethod
    def _names(cls, v: list[str | BenchmarkFile]) -> list[str | BenchmarkFile]:
        if not v:
            raise ValueError("give at least one benchmark")
        for b in v:
            if isinstance(b, str):
                check_name(b)
        return v


@register("decontaminate")
class Decontaminate(RowStage):
    version: ClassVar[str] = "1"
    Params = DecontaminateParams
    params: DecontaminateParams

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._bench: pl.DataFrame | None = None
        self._index: Any = None
        self._bench_vecs: np.ndarray | None = None
        self._model: Any = None

    # -- declarations ------------------------------------------------------------------------
    def input_columns(self) -> list[str]:
        cols = [self.params.field]
        if self.params.embedding_threshold is not None:
            cols.append(self.params.embedding)
        return cols

    def output_columns(self) -> list[str]:
        return list(OUT_COLS)

    def _benchmarks(self) -> pl.DataFrame:
        if self._bench is None:
            self._bench = load_benchmarks(self.params.benchmarks, self.ctx.recipe_dir)
        return self._bench

    def _model_path(self) -> str:
        from tracepipe.text.embedding import resolve_model

        return resolve_model(self.params.model, self.ctx.recipe_dir)

    def fingerprint_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"benchmarks_digest": benchmarks_digest(self._benchmarks())}
        if self.params.embedding_threshold is not None:
            from tracepipe.text.embedding import model_fingerprint

            extra["model"] = model_fingerprint(self._model_path())
        return extra

    def summarize(self, out: pl.LazyFrame) -> dict[str, Any]:
        if "contam_method" not in out.collect_schema().names():
            return {}
        flagged = out.filter(pl.col("contam_method").is_not_null()).group_by("contam_benchmark", "contam_method").len().collect()
        return {"flagged_kept": {f"{b}:{m}": int(n) for b, m, n in flagged.iter_rows()}} if flagged.height else {}

    # -- lifecycle ---------------------------------------------------------------------------
    def setup(self) -> None:
        from tracepipe.text.ngrams import NgramIndex

        bench = self._benchmarks()
        self._index = NgramIndex(bench["text"].to_list(), self.params.ngram, self.params.min_ngram)

    def teardown(self) -> None:
        self._index = None
        self._model = None

    def _embedder(self) -> Any:
        if self._model is None:
            from tracepipe.text.embedding import load_model

            self._model = load_model(self._model_path())
        return self._model

    def _benchmark_vectors(self) -> np.ndarray:
        """Benchmark embeddings, cached on disk by benchmark content and model fingerprint."""
        if self._bench_vecs is not None:
            return self._bench_vecs
        from tracepipe.hashing import fingerprint
        from tracepipe.text.embedding import encode, model_fingerprint

        bench = self._benchmarks()
        key = fingerprint({"b": benchmarks_digest(bench), "m": model_fingerprint(self._model_path())})
        cache = self.ctx.workdir / "cache" / f"decontaminate-benchmarks-{key}.npy"
        if cache.exists():
            vecs = np.load(cache)
        else:
            vecs = encode(self._embedder(), bench["text"].to_list(), self.params.encode_batch_size, normalize=True)
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npy")
            np.save(tmp, vecs)
            tmp.replace(cache)
        self._bench_vecs = vecs.astype(np.float32)
        return self._bench_vecs

    def _row_vectors(self, batch: pl.DataFrame, texts: list[str]) -> np.ndarray:
        from tracepipe.text.embedding import encode
        from tracepipe.text.vectors import normalized

        col = self.params.embedding
        if col in batch.columns and batch[col].null_count() < batch.height:
            s = batch[col]
            if isinstance(s.dtype, pl.List):
                s = s.cast(pl.Array(pl.Float32, int(s.list.len().max() or 0)))
            dim = s.dtype.size if isinstance(s.dtype, pl.Array) else 0
            x = np.zeros((batch.height, dim), dtype=np.float32)
            valid = s.is_not_null().to_numpy()
            if valid.any():
                x[valid] = s.filter(pl.Series(valid)).to_numpy()
            return normalized(x)
        return encode(self._embedder(), texts, self.params.encode_batch_size, normalize=True)

    # -- processing --------------------------------------------------------------------------
    def process(self, batch: pl.DataFrame) -> pl.DataFrame:
        p = self.params
        if self._index is None:
            self.setup()
        bench = self._benchmarks()
        names, ids = bench["benchmark"].to_list(), bench["id"].to_list()
        texts = ["" if t is None else str(t) for t in (batch[p.field].to_list() if p.field in batch.columns else [None] * batch.height)]
        n = batch.height
        item: list[int | None] = [None] * n
        method: list[str | None] = [None] * n
        score: list[float | None] = [None] * n
        for r, text in enumerate(texts):
            m = self._index.best(text)
            if m is not None and m.score >= p.min_overlap:
                item[r], method[r], score[r] = m.item, "ngram", round(m.score, 4)
        if p.embedding_threshold is not None and n:
            bvec = self._benchmark_vectors()
            x = self._row_vectors(batch, texts)
            if x.shape[1] != bvec.shape[1]:
                raise ValueError(f"row vectors have {x.shape[1]} dimensions, benchmark vectors {bvec.shape[1]}: "
                                 "decontaminate's `model` must be the model `embed` used")
            sims = x @ bvec.T
            best = sims.argmax(axis=1)
            best_sim = sims[np.arange(n), best]
            for r in range(n):
                if item[r] is None and best_sim[r] >= p.embedding_threshold:
                    item[r], method[r], score[r] = int(best[r]), "embedding", round(float(best_sim[r]), 4)
        drop = [f"decontaminate:{m}" if (m is not None and p.drop) else None for m in method]
        return pl.DataFrame({
            IN_KEY_COL: batch[IN_KEY_COL],
            "contam_benchmark": pl.Series([names[i] if i is not None else None for i in item], dtype=pl.String),
            "contam_id": pl.Series([ids[i] if i is not None else None for i in item], dtype=pl.String),
            "contam_method": pl.Series(method, dtype=pl.String),
            "contam_score": pl.Series(score, dtype=pl.Float64),
            DROP_COL: pl.Series(drop, dtype=pl.String),
        })
