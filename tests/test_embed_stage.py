"""embed: the shipped all-MiniLM-L6-v2 loaded by path, offline; vectors in the store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tests.fixtures.dedup_data import run_recipe
from tracepipe.pipeline.runner import RunFailed
from tracepipe.stages.embed import Embed, EmbedParams
from tracepipe.text.embedding import default_model_dir, model_fingerprint

pytestmark = pytest.mark.slow


def _vectors(res, tmp: Path, name: str = "t") -> pl.DataFrame:
    """The rows of ``<name>.jsonl`` joined with their vectors from the embed stage's store."""
    from tracepipe.pipeline.keys import row_keys
    from tracepipe.pipeline.store import StageStore

    store = StageStore(str(tmp / "work"), "embed", res.stats.stages[0].fingerprint).scan()
    assert store is not None
    rows = pl.read_ndjson(tmp / f"{name}.jsonl")
    rows = rows.with_columns(row_keys(rows, ["problem"]))
    return rows.join(store.collect(), on="_in_key", how="left", maintain_order="left")


def test_default_model_is_the_packaged_one() -> None:
    d = default_model_dir()
    assert (d / "model.safetensors").exists() and "site-packages" in str(d)
    assert model_fingerprint(str(d)) == model_fingerprint(str(d))
    st = Embed(EmbedParams())
    assert st.fingerprint_extra() == {"model": model_fingerprint(str(d))}
    # execution knobs stay out of the fingerprint
    assert Embed(EmbedParams(batch_size=7, encode_batch_size=3)).fingerprint_inputs() == st.fingerprint_inputs()


def test_embed_through_runner_cached_and_meaningful(tmp_path: Path, train_texts: list[str]) -> None:
    rows = pl.DataFrame({"rid": [str(i) for i in range(6)], "problem": [
        train_texts[0], train_texts[0].upper(), train_texts[1], "", train_texts[2], train_texts[2] + " Explain."]})
    res, rej = run_recipe(tmp_path, rows, "  - embed: {}\n")
    assert rej.height == 0
    st = res.stats.stages[0]
    assert st.computed == 6
    df = _vectors(res, tmp_path)
    assert df.schema["embedding"] == pl.Array(pl.Float32, 384)
    x = df["embedding"].to_numpy()
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-4)
    cos = x @ x.T
    assert cos[0, 1] > 0.99  # the model is uncased
    assert cos[4, 5] > 0.9 and cos[0, 2] < cos[4, 5]
    res2, _ = run_recipe(tmp_path, rows, "  - embed: {}\n")
    assert res2.stats.stages[0].computed == 0 and res2.stats.stages[0].cached == 6


def test_float16_and_other_field(tmp_path: Path) -> None:
    rows = pl.DataFrame({"rid": ["a", "b"], "problem": ["p1", "p2"], "response": ["The answer is 4.", "It is 5."]})
    res, _ = run_recipe(tmp_path, rows, "  - embed: {field: response, column: resp_vec, dtype: float16, normalize: false}\n")
    from tracepipe.pipeline.store import StageStore

    got = StageStore(str(tmp_path / "work"), "embed", res.stats.stages[0].fingerprint).scan().collect()
    assert got.schema["resp_vec"] == pl.Array(pl.Float16, 384)
    v = got["resp_vec"].to_numpy().astype(np.float32)
    # all-MiniLM-L6-v2 ends with a Normalize module, so its vectors are unit-norm either way
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=2e-3) and float(v[0] @ v[1]) < 0.99


def test_missing_model_path_fails(tmp_path: Path) -> None:
    rows = pl.DataFrame({"rid": ["a"], "problem": ["x"]})
    with pytest.raises(RunFailed, match=r"stages\[0\]\.embed: .*FileNotFoundError.*no-such-model"):
        run_recipe(tmp_path, rows, "  - embed: {model: ./no-such-model}\n")
