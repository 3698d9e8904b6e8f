"""Read ``opd`` shards as padded tensor batches for an offline on-policy-distillation trainer.

::

    from tracepipe.formats import OPDReader

    for batch in OPDReader("out/gsm8k-opd", batch_size=8, max_length=4096):
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        student_lp = logits[:, :-1].float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        mask = batch["loss_mask"][:, 1:]
        # per-token reverse KL estimate on the student's own tokens (Lightning OPD)
        loss = ((student_lp - batch["teacher_logprobs"][:, 1:]) * mask).sum() / mask.sum()

Batch keys (``B`` rows, ``L`` = longest row in the batch, after ``max_length``):

- ``input_ids`` int64 ``[B, L]`` (right padded with ``pad_token_id``), ``attention_mask`` int64;
- ``loss_mask`` float32 ``[B, L]``: 1 on the completion tokens (0 on prompt and padding);
- ``teacher_logprobs`` float32 ``[B, L]``: ``[b, i] = log p_teacher(ids[i] | ids[:i])``; 0 where
  there is none (position 0, padding). Position ``i`` pairs with the student's logits at ``i-1``;
- with top-k in the shards (and ``top_k=True``): ``teacher_topk_ids`` int64 ``[B, L, k]`` and
  ``teacher_topk_logprobs`` float32 ``[B, L, k]`` (best first; 0 where there is none);
- ``n_tokens`` int64 ``[B]``;
- with TIP columns in the shards (``tip`` / ``tip_mask`` stages; ``tip=True``): ``tip_mask``
  float32 ``[B, L]`` (1 on the positions the TIP rule keeps, always within ``loss_mask``),
  ``tip_class`` int64 ``[B, L]`` (0 = not classified, 1-4 the TIP classes), ``student_logprobs``,
  ``student_entropy`` and ``tip_log_ratio`` float32 ``[B, L]`` (0 where there is none), and
  ``tip_kl`` float32 ``[B, L]`` (NaN where there is none: no shared top-k). All aligned with
  ``input_ids`` like ``teacher_logprobs``.

``as_tensors="numpy"`` gives NumPy arrays (no torch needed). ``shuffle=True`` reads the selected
columns of all shards into memory and draws a seeded permutation; otherwise shards stream in
order, one Parquet batch at a time. :func:`collate_opd` pads a list of row dicts the same way
(a ``collate_fn`` for ``datasets`` + ``torch.utils.data.DataLoader``).
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TOPK_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs")
#: TIP per-position columns -> (dtype, fill where there is none)
TIP_COLUMNS: dict[str, tuple[Any, float]] = {
    "tip_mask": (np.float32, 0.0),
    "tip_class": (np.int64, 0),
    "student_logprobs": (np.float32, 0.0),
    "student_entropy": (np.float32, 0.0),
    "tip_log_ratio": (np.float32, 0.0),
    "tip_kl": (np.float32, np.nan),
}


def opd_files(source: str | Path | Sequence[str | Path], split: str = "train") -> list[str]:
    """Shard paths of an ``opd`` output: a directory (``data/<split>-*.parquet``), a glob, or files."""
    if isinstance(source, (list, tuple)):
        return [str(s) for s in source]
    p = Path(source)
    if p.is_dir():
        files = sorted(glob.glob(str(p / "data" / f"{split}-*.parquet"))) or sorted(glob.glob(str(p / "*.parquet")))
    elif p.is_file():
        files = [str(p)]
    else:
        files = sorted(glob.glob(str(source)))
    if not files:
        raise FileNotFoundError(f"no opd shards found at {source} (split {split!r})")
    return files


def _flat(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def _offsets_values(arr: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Offsets (rebased to 0, nulls as empty) and child values of a list array."""
    arr = _flat(arr)
    if arr.null_count:
        arr = arr.fill_null(pa.scalar([], type=arr.type))
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    values = arr.values.slice(offsets[0], offsets[-1] - offsets[0])
    return offsets - offsets[0], values


def _positions(offsets: np.ndarray, max_length: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(row index, column index, keep) of every flattened element, and the padded length."""
    lens = np.diff(offsets)
    rows = np.repeat(np.arange(len(lens)), lens)
    cols = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lens)
    keep = cols < max_length if max_length else np.ones(len(cols), dtype=bool)
    width = int(min(lens.max(initial=0), max_length) if max_length else lens.max(initial=0))
    return rows, cols, keep, width


def _pad2(arr: pa.Array, dtype: Any, fill: float, max_length: int | None) -> tuple[np.ndarray, np.ndarray]:
    offsets, values = _offsets_values(arr)
    rows, cols, keep, width = _positions(offsets, max_length)
    vals = values.to_numpy(zero_copy_only=False)
    if values.null_count:
        vals = np.where(values.is_null().to_numpy(zero_copy_only=False), fill, vals)
    out = np.full((len(offsets) - 1, width), fill, dtype=dtype)
    out[rows[keep], cols[keep]] = vals[keep]
    valid = np.zeros((len(offsets) - 1, width), dtype=bool)
    valid[rows[keep], cols[keep]] = True
    return out, valid


def _pad3(arr: pa.Array, dtype: Any, max_length: int | None) -> np.ndarray:
    """list<list<T>> -> ``[B, L, k]`` (0 where a position has no entries)."""
    offsets, positions = _offsets_values(arr)
    rows, cols, keep, width = _positions(offsets, max_length)
    inner_off, inner_vals = _offsets_values(positions)
    k_lens = np.diff(inner_off)
    k = int(k_lens.max(initial=0))
    out = np.zeros((len(offsets) - 1, width, k), dtype=dtype)
    if k == 0:
        return out
    pos = np.repeat(np.arange(len(k_lens)), k_lens)
    j = np.arange(inner_off[-1]) - np.repeat(inner_off[:-1], k_lens)
    vals = inner_vals.to_numpy(zero_copy_only=False)
    sel = keep[pos]
    out[rows[pos[sel]], cols[pos[sel]], j[sel]] = vals[sel]
    return out


def _to(batch: dict[str, np.ndarray], as_tensors: str) -> dict[str, Any]:
    if as_tensors == "numpy":
        return batch
    import torch

    return {k: torch.from_numpy(v) for k, v in batch.items()}


def pad_table(table: pa.Table, *, pad_token_id: int = 0, max_length: int | None = None, top_k: bool = True,
              as_tensors: str = "torch", tip: bool = True) -> dict[str, Any]:
    """One padded batch from an Arrow table of ``opd`` rows."""
    ids, valid = _pad2(table.column("token_ids"), np.int64, pad_token_id, max_length)
    mask, _ = _pad2(table.column("loss_mask"), np.float32, 0, max_length)
    lps, _ = _pad2(table.column("teacher_logprobs"), np.float32, 0.0, max_length)
    out: dict[str, np.ndarray] = {
        "input_ids": ids,
        "attention_mask": valid.astype(np.int64),
        "loss_mask": mask,
        "teacher_logprobs": lps,
        "n_tokens": valid.sum(axis=1).astype(np.int64),
    }
    if top_k and all(c in table.column_names for c in TOPK_COLUMNS):
        out["teacher_topk_ids"] = _pad3(table.column("teacher_topk_ids"), np.int64, max_length)
        out["teacher_topk_logprobs"] = _pad3(table.column("teacher_topk_logprobs"), np.float32, max_length)
    if tip:
        for name, (dtype, fill) in TIP_COLUMNS.items():
            if name in table.column_names:
                out[name] = _pad2(table.column(name), dtype, fill, max_length)[0]
    return _to(out, as_tensors)


def collate_opd(rows: list[dict[str, Any]], *, pad_token_id: int = 0, max_length: int | None = None, top_k: bool = True,
                as_tensors: str = "torch", tip: bool = True) -> dict[str, Any]:
    """Pad a list of ``opd`` row dicts (e.g. from ``datasets``) into one batch."""
    cols = ["token_ids", "loss_mask", "teacher_logprobs", *(c for c in TOPK_COLUMNS if top_k and c in rows[0]),
            *(c for c in TIP_COLUMNS if tip and c in rows[0])]
    types = {
        "token_ids": pa.list_(pa.int64()), "loss_mask": pa.list_(pa.int8()), "teacher_logprobs": pa.list_(pa.float32()),
        "teacher_topk_ids": pa.list_(pa.list_(pa.int64())), "teacher_topk_logprobs": pa.list_(pa.list_(pa.float32())),
        "tip_mask": pa.list_(pa.int8()), "tip_class": pa.list_(pa.int8()),
        **{c: pa.list_(pa.float32()) for c in ("student_logprobs", "student_entropy", "tip_log_ratio", "tip_kl")},
    }
    table = pa.table({c: pa.array([r[c] for r in rows], type=types[c]) for c in cols})
    return pad_table(table, pad_token_id=pad_token_id, max_length=max_length, top_k=top_k, as_tensors=as_tensors, tip=tip)


class OPDReader:
    """Iterate padded batches over ``opd`` shards (see the module docstring)."""

    def __init__(
        self,
        source: str | Path | Sequence[str | Path],
        *,
        batch_size: int = 8,
        split: str = "train",
        max_length: int | None = None,
        pad_token_id: int = 0,
        top_k: bool = True,
        tip: bool = True,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        as_tensors: str = "torch",
    ) -> None:
        if as_tensors not in ("torch", "numpy"):
            raise ValueError("as_tensors must be 'torch' or 'numpy'")
        self.files = opd_files(source, split)
        self.batch_size = batch_size
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.drop_last = drop_last
        self.as_tensors = as_tensors
        names = pq.read_schema(self.files[0]).names
        missing = [c for c in ("token_ids", "loss_mask", "teacher_logprobs") if c not in names]
        if missing:
            raise ValueError(f"{self.files[0]} is not an opd shard: no {', '.join(missing)}")
        self.top_k = top_k and all(c in names for c in TOPK_COLUMNS)
        self.tip = [c for c in TIP_COLUMNS if tip and c in names]
        self.columns = ["token_ids", "loss_mask", "teacher_logprobs", *(TOPK_COLUMNS if self.top_k else ()), *self.tip]
        self.num_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in self.files)

    def __len__(self) -> int:
        n, r = divmod(self.num_rows, self.batch_size)
        return n if self.drop_last or not r else n + 1

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle differently each epoch (``shuffle=True``)."""
        self.epoch = epoch

    def _tables(self) -> Iterator[pa.Table]:
        if self.shuffle:
            table = pa.concat_tables(pq.read_table(f, columns=self.columns) for f in self.files)
            order = np.random.default_rng(self.seed + self.epoch).permutation(table.num_rows)
            for start in range(0, table.num_rows, self.batch_size):
                yield table.take(pa.array(order[start:start + self.batch_size]))
            return
        pending: list[pa.RecordBatch] = []
        rows = 0
        for f in self.files:
            for b in pq.ParquetFile(f).iter_batches(batch_size=self.batch_size, columns=self.columns):
                pending.append(b)
                rows += b.num_rows
                while rows >= self.batch_size:
                    t = pa.Table.from_batches(pending)
                    yield t.slice(0, self.batch_size)
                    rest = t.slice(self.batch_size)
                    pending, rows = rest.to_batches(), rest.num_rows
        if rows:
            yield pa.Table.from_batches(pending)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for t in self._tables():
            if self.drop_last and t.num_rows < self.batch_size:
                return
            yield pad_table(t, pad_token_id=self.pad_token_id, max_length=self.max_length, top_k=self.top_k,
                            as_tensors=self.as_tensors, tip=bool(self.tip))
