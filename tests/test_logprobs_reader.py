"""``opd`` shards -> padded batches: :class:`OPDReader` and :func:`collate_opd` (with ``datasets``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from tests.fixtures.logprobs_data import logprobs_recipe, rollout_rows, write_jsonl
from tracepipe.formats import OPDReader, collate_opd, opd_files
from tracepipe.pipeline.runner import Runner
from tracepipe.recipe import load_recipe

K = 3


@pytest.fixture(scope="module")
def opd_out(tmp_path_factory: pytest.TempPathFactory, hf_engines: dict[str, Any]) -> Path:
    tmp = tmp_path_factory.mktemp("opd-reader")
    src = write_jsonl(tmp / "rollouts.jsonl", rollout_rows(7, start=900))
    recipe = logprobs_recipe(tmp, "reader", src, hf_engines, [{"logprobs": {"engine": "teacher", "top_k": K, "max_length": 160}}],
                             outputs=[{"format": "opd", "path": str(tmp / "out"), "row_group_rows": 3}])
    Runner(load_recipe(recipe)).run()
    return tmp / "out"


def _rows(out: Path) -> pl.DataFrame:
    return pl.read_parquet(opd_files(out))


def test_reader_batches_hold_the_rows(opd_out: Path) -> None:
    rows = _rows(opd_out)
    assert rows.height == 7 and {"prompt", "teacher", "generator", "n_tokens", "truncated"} <= set(rows.columns)
    reader = OPDReader(opd_out, batch_size=3, as_tensors="numpy", pad_token_id=-1)
    assert len(reader) == 3 and reader.num_rows == 7
    batches = list(reader)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 1]
    seen = 0
    for b in batches:
        for j in range(b["input_ids"].shape[0]):
            r = rows.row(seen, named=True)
            n = len(r["token_ids"])
            assert b["n_tokens"][j] == n and b["input_ids"].shape[1] >= n
            assert b["input_ids"][j, :n].tolist() == r["token_ids"] and (b["input_ids"][j, n:] == -1).all()
            assert b["attention_mask"][j].tolist() == [1] * n + [0] * (b["input_ids"].shape[1] - n)
            assert b["loss_mask"][j, :n].tolist() == r["loss_mask"]
            assert b["teacher_logprobs"][j, 0] == 0
            np.testing.assert_array_equal(b["teacher_logprobs"][j, 1:n], np.asarray(r["teacher_logprobs"][1:], dtype=np.float32))
            assert b["teacher_topk_ids"].shape[2] == K
            assert b["teacher_topk_ids"][j, 1:n].tolist() == r["teacher_topk_ids"][1:]
            np.testing.assert_array_equal(b["teacher_topk_logprobs"][j, 1:n], np.asarray(r["teacher_topk_logprobs"][1:], dtype=np.float32))
            assert (b["teacher_topk_logprobs"][j, 0] == 0).all()
            seen += 1
    assert seen == 7


def test_reader_options(opd_out: Path) -> None:
    rows = _rows(opd_out)
    cut = next(iter(OPDReader(opd_out, batch_size=7, max_length=20, top_k=False, as_tensors="numpy")))
    assert cut["input_ids"].shape == (7, 20) and "teacher_topk_ids" not in cut
    assert cut["input_ids"].tolist() == [r[:20] for r in rows["token_ids"].to_list()]
    assert len(list(OPDReader(opd_out, batch_size=3, drop_last=True, as_tensors="numpy"))) == 2
    shuffled = OPDReader(opd_out, batch_size=7, shuffle=True, seed=3, as_tensors="numpy")
    a = next(iter(shuffled))["n_tokens"].tolist()
    shuffled.set_epoch(1)
    b = next(iter(shuffled))["n_tokens"].tolist()
    assert sorted(a) == sorted(b) == sorted(rows["n_tokens"].to_list())
    torch_batch = next(iter(OPDReader(opd_out, batch_size=2)))
    import torch

    assert torch_batch["input_ids"].dtype == torch.int64 and torch_batch["loss_mask"].dtype == torch.float32


def test_collate_with_datasets_and_dataloader(opd_out: Path) -> None:
    from datasets import load_dataset
    from torch.utils.data import DataLoader

    ds = load_dataset("parquet", data_files=opd_files(opd_out))["train"]
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_opd)
    ref = list(OPDReader(opd_out, batch_size=4))
    got = list(loader)
    assert len(got) == len(ref) == 2
    for a, b in zip(got, ref):
        assert set(a) == set(b)
        for k in a:
            assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()), k
