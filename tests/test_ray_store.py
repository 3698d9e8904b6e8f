"""The stage store on fsspec URLs (``memory://``, ``file://``, plain paths): what lets a Ray
cluster and local runs share one cache. Parts are atomic, listings fresh, duplicates dropped."""

from __future__ import annotations

import pickle
import shutil
import uuid
from pathlib import Path
from typing import Any

import fsspec
import polars as pl
import pytest
from polars.testing import assert_frame_equal

import tracepipe
from tracepipe.pipeline import store as store_mod
from tracepipe.pipeline.keys import IN_KEY_COL
from tracepipe.pipeline.runner import Runner
from tracepipe.pipeline.store import (
    IDX_COL,
    StageStore,
    is_local,
    list_stage_dirs,
    local_path,
    write_parquet_atomic,
)
from tracepipe.recipe import load_recipe

# Ray Data warns about its own deprecated settings when it reads its context; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")
GSM8K = Path(tracepipe.__file__).parent / "data" / "sources" / "gsm8k_train.jsonl"


@pytest.fixture(params=["memory", "file", "path"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "memory":
        url = f"memory://tp-{uuid.uuid4().hex[:8]}"
        yield url
        fs = fsspec.filesystem("memory")
        fs.rm(url.removeprefix("memory://"), recursive=True)
    elif request.param == "file":
        yield f"file://{tmp_path}/wd"
    else:
        yield str(tmp_path / "wd")


def part(keys: list[str], values: list[Any], idx: list[int] | None = None, drop: list[str | None] | None = None) -> pl.DataFrame:
    return pl.DataFrame({
        IN_KEY_COL: keys, IDX_COL: idx or [0] * len(keys), "_drop": drop or [None] * len(keys), "v": values,
    }, schema_overrides={"_drop": pl.String})


def test_commit_parts_keys_scan(root: str) -> None:
    s = StageStore(root, "map", "fp1", meta={"stage": "map", "params": {"x": 1}})
    assert s.parts() == [] and s.keys() == set() and s.scan() is None
    s.commit(part(["a", "b"], ["A", "B"]))
    s.commit(part(["b", "c", "c"], ["B-late", "C0", "C1"], idx=[0, 0, 1], drop=[None, "too long", None]))
    assert len(s.parts()) == 2 and s.keys() == {"a", "b", "c"}
    got = s.scan().collect().sort(IN_KEY_COL, IDX_COL)  # type: ignore[union-attr]
    # (b, 0) was committed twice: the oldest part wins
    assert got.select(IN_KEY_COL, IDX_COL, "v").rows() == [("a", 0, "A"), ("b", 0, "B"), ("c", 0, "C0"), ("c", 1, "C1")]
    assert got.filter(pl.col(IN_KEY_COL) == "c")["_drop"].to_list() == ["too long", None]
    # a fresh store object (another process, another machine) sees the same thing
    again = StageStore(root, "map", "fp1")
    assert again.keys() == {"a", "b", "c"}
    assert_frame_equal(again.scan().collect().sort(IN_KEY_COL, IDX_COL), got)  # type: ignore[union-attr]
    fs, path = fsspec.core.url_to_fs(s.url)
    assert '"x": 1' in fs.cat_file(f"{path.rstrip('/')}/meta.json").decode()
    assert list_stage_dirs(root) == ["map-fp1"]


def test_parts_with_different_schemas_are_combined(root: str) -> None:
    s = StageStore(root, "gen", "fp")
    s.commit(part(["a"], [None]))  # a column all null in one batch (dtype Null)
    s.commit(part(["b"], ["text"]))
    s.commit(part(["c"], ["more"]).with_columns(pl.lit(3).alias("extra")))
    got = s.scan().collect().sort(IN_KEY_COL)  # type: ignore[union-attr]
    assert got["v"].to_list() == [None, "text", "more"] and got.schema["v"] == pl.String
    assert got["extra"].to_list() == [None, None, 3]


def test_decisions_round_trip(root: str) -> None:
    s = StageStore(root, "dedup", "fp")
    assert s.load_decision("d1") is None
    dec = pl.DataFrame({"_key": ["a", "b"], "_drop": [None, "dedup:exact"]})
    s.save_decision("d1", dec)
    assert_frame_equal(StageStore(root, "dedup", "fp").load_decision("d1"), dec)  # type: ignore[arg-type]


def test_store_pickles_for_workers(root: str) -> None:
    s = StageStore(root, "map", "fp")
    s.commit(part(["a"], ["A"]))
    clone = pickle.loads(pickle.dumps(s))
    assert clone.keys() == {"a"} and clone.url == s.url


def test_a_failed_write_leaves_no_part(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The data is fully written to a temporary name; if the final rename fails (a crash at that
    moment), there is no part and no temporary file."""
    from fsspec.implementations.memory import MemoryFileSystem

    s = StageStore(root, "map", "fp")
    s.commit(part(["a"], ["A"]))

    def boom(*a: Any, **k: Any) -> None:
        raise OSError("killed while renaming")

    monkeypatch.setattr(store_mod.os, "replace", boom)
    monkeypatch.setattr(MemoryFileSystem, "mv", boom)
    with pytest.raises(OSError, match="renaming"):
        s.commit(part(["b"], ["B"]))
    monkeypatch.undo()
    assert s.keys() == {"a"} and len(s.parts()) == 1
    fs, path = fsspec.core.url_to_fs(s.url)
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    assert not [n for n in names if n.startswith(".tmp-")]  # nothing half-written left behind
    s.commit(part(["b"], ["B"]))
    assert s.keys() == {"a", "b"}


def test_object_store_writes_are_single_puts(monkeypatch: pytest.MonkeyPatch) -> None:
    """On S3/GCS a part is one PUT (atomic); checked with a memory filesystem posing as s3."""
    fs = fsspec.filesystem("memory")
    puts: list[str] = []
    moves: list[str] = []
    monkeypatch.setattr(fs, "protocol", ("s3", "s3a"))
    orig_pipe = fs.pipe_file
    monkeypatch.setattr(fs, "pipe_file", lambda p, d, **k: (puts.append(p), orig_pipe(p, d, **k))[1])
    monkeypatch.setattr(fs, "mv", lambda *a, **k: moves.append(a[0]))
    store_mod._put_atomic(fs, "/bucket/x/part-1.parquet", b"data", local=False)
    assert puts == ["/bucket/x/part-1.parquet"] and moves == []
    assert fs.cat_file("/bucket/x/part-1.parquet") == b"data"
    fs.rm("/bucket", recursive=True)


def test_helpers() -> None:
    assert is_local("/a/b") and is_local("file:///a/b") and not is_local("s3://b/x") and not is_local("memory://x")
    assert local_path("file:///a/b") == Path("/a/b")
    url = f"memory://tp-{uuid.uuid4().hex[:8]}/one.parquet"
    write_parquet_atomic(pl.DataFrame({"a": [1]}), url)
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as fh:
        assert pl.read_parquet(fh)["a"].to_list() == [1]
    fs.rm(path)


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_run_on_a_memory_workdir(tmp_path: Path, executor: str, request: pytest.FixtureRequest) -> None:
    """A whole recipe with its store on ``memory://``; the Ray executor commits from the driver,
    so even a store only the driver can see works (and the two executors share it)."""
    if executor == "ray":
        request.getfixturevalue("ray_local")
    name = f"mem-{uuid.uuid4().hex[:8]}"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: {name}
workdir: memory://{name}
source:
  - path: {GSM8K}
    preset: gsm8k
    limit: 600
stages:
  - dedup: {{method: exact}}
  - filter: {{store: true, where: "length(problem) < 300"}}
  - map: {{store: true, set: {{n_chars: "length(problem)"}}, batch_size: 100}}
executor: {{kind: {executor}}}
""")
    try:
        stats = {s["name"]: s for s in Runner(load_recipe(recipe)).run().stats.to_dict()["stages"]}
        assert stats["map"]["computed"] > 0
        (map_dir,) = [d for d in list_stage_dirs(f"memory://{name}") if d.startswith("map-")]
        s = StageStore(f"memory://{name}", "map", map_dir.split("-", 1)[1])
        assert len(s.parts()) == -(-stats["map"]["computed"] // 100)
        res = s.scan().collect()  # type: ignore[union-attr]
        assert res.height == stats["map"]["computed"] and res["n_chars"].min() > 0
        # the other executor finds everything in the shared store
        shutil.rmtree(Path("/tmp/tracepipe") / name / "frames", ignore_errors=True)
        r = load_recipe(recipe)
        r.executor.kind = "ray" if executor == "local" else "local"  # type: ignore[assignment]
        if r.executor.kind == "ray":
            request.getfixturevalue("ray_local")
        again = {s["name"]: s for s in Runner(r).run().stats.to_dict()["stages"]}
        assert again["map"]["computed"] == 0 and again["filter"]["computed"] == 0
    finally:
        fs = fsspec.filesystem("memory")
        if fs.exists(f"/{name}"):
            fs.rm(f"/{name}", recursive=True)
        shutil.rmtree(Path("/tmp/tracepipe") / name, ignore_errors=True)
