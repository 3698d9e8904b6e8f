"""Push to the Hub, tested against a FAKE Hub on 127.0.0.1 (tests/fixtures/fake_hub.py), NOT the real
Hugging Face Hub: it speaks the endpoints huggingface_hub calls (repo create, preupload, LFS batch +
upload + verify, ndjson commit, tree listing), with Xet disabled in the client. Also: push to a
plain directory (``push.url``)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.fake_hub import FakeHub
from tests.fixtures.outputs_data import write_traces_recipe

REPO = "tester/traces"


def _env(hub: FakeHub, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=hub.token, HF_HUB_DISABLE_XET="1", HF_HOME=str(Path(env.get("TMPDIR", "/tmp")) / "hf-home-push-tests"))
    env.update(extra)
    return env


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tracepipe.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _outputs(push: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"format": "sft-messages", "path": "out", "shard_size_mb": 0.015, "row_group_rows": 8, "push": push}]


def _commits(hub: FakeHub) -> list[dict[str, Any]]:
    return [r for r in hub.requests if r["method"] == "POST" and "/commit/" in r["path"]]


def _assert_no_token(token: str, tmp_path: Path, texts: list[str]) -> None:
    for t in texts:
        assert token not in t
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert token.encode() not in p.read_bytes(), p


@pytest.mark.slow
def test_run_pushes_then_repush_sends_only_changed_shards(fake_hub: FakeHub, tmp_path: Path) -> None:
    env = _env(fake_hub, HF_HUB_DISABLE_PROGRESS_BARS="1")
    recipe = write_traces_recipe(tmp_path, _outputs({"repo": REPO, "private": True}), limit=120)
    logs: list[str] = []

    # 1. `tracepipe run` writes the output and pushes it (outputs[].push): everything goes up, one commit
    r = _cli(["run", str(recipe), "--no-progress"], env)
    logs += [r.stdout, r.stderr]
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    shards = sorted((out / "data").glob("*.parquet"))
    assert len(shards) >= 3
    first_files = {f"data/{p.name}": _sha(p) for p in shards}
    assert len(_commits(fake_hub)) == 1
    (commit,) = fake_hub.commit_log
    assert set(first_files) | {"README.md", "recipe.yaml", "summary.json", "token_lengths.png", "difficulty.png",
                               "browser.html"} == set(commit["added"])
    assert set(fake_hub.lfs_uploads) == set(first_files.values()) | {_sha(out / "token_lengths.png"), _sha(out / "difficulty.png")}
    remote = fake_hub.files(REPO)
    for path, sha in first_files.items():
        assert hashlib.sha256(remote[path]).hexdigest() == sha
    assert remote["README.md"] == (out / "README.md").read_bytes()
    assert fake_hub.repos[REPO].private

    # 2. `tracepipe push` with nothing changed: no commit, no upload
    fake_hub.reset_log()
    r = _cli(["push", str(recipe)], env)
    logs += [r.stdout, r.stderr]
    assert r.returncode == 0 and "up to date" in r.stdout, r.stdout + r.stderr
    assert not _commits(fake_hub) and not fake_hub.lfs_uploads

    # 3. more problems: the run re-pushes in ONE commit; only new shard contents are uploaded,
    #    shards whose bytes are unchanged are not re-sent, stale shard names are deleted
    write_traces_recipe(tmp_path, _outputs({"repo": REPO, "private": True}), limit=170)
    fake_hub.reset_log()
    r = _cli(["run", str(recipe), "--no-progress"], env)
    logs += [r.stdout, r.stderr]
    assert r.returncode == 0, r.stderr
    new_shards = sorted((out / "data").glob("*.parquet"))
    new_files = {f"data/{p.name}": _sha(p) for p in new_shards}
    assert len(_commits(fake_hub)) == 1
    (commit,) = fake_hub.commit_log
    shard_uploads = set(fake_hub.lfs_uploads) & set(new_files.values())
    changed = set(new_files.values()) - set(first_files.values())
    assert shard_uploads == changed and 0 < len(changed) < len(new_files)
    kept_content = set(new_files.values()) & set(first_files.values())
    assert kept_content and not (kept_content & set(fake_hub.lfs_uploads))  # unchanged bytes never re-uploaded
    assert set(commit["deleted"]) == set(first_files) - set(new_files)
    remote = fake_hub.files(REPO)
    assert {p for p in remote if p.startswith("data/")} == set(new_files)
    for path, sha in new_files.items():
        assert hashlib.sha256(remote[path]).hexdigest() == sha

    # every API call carried the token in the Authorization header; nothing else ever shows it
    api_calls = [q for q in fake_hub.requests if q["path"].startswith(("/api/datasets/", "/api/repos/"))]
    assert api_calls and all(q["auth"] == "ok" for q in api_calls)
    _assert_no_token(fake_hub.token, tmp_path, logs)


def test_push_to_branch_in_process(hub_client_env: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.fixtures.outputs_data import run_recipe
    from tracepipe.hub import push_outputs

    hub = hub_client_env
    path = write_traces_recipe(tmp_path, _outputs({"repo": REPO, "revision": "v1", "private": False}), limit=20)
    monkeypatch.setenv("TRACEPIPE_NO_PUSH", "1")
    recipe, _ = run_recipe(path)
    monkeypatch.delenv("TRACEPIPE_NO_PUSH")
    assert not _commits(hub)  # the run did not push
    lines = list(push_outputs(recipe))
    assert len(lines) == 1 and f"{REPO}@v1" in lines[0]
    assert "README.md" in hub.files(REPO, "v1") and hub.files(REPO, "main") == {}
    assert not hub.repos[REPO].private
    # --repo overrides the target
    lines = list(push_outputs(recipe, repo="tester/other"))
    assert "tester/other" in lines[0] and "data/train-00000-of-00001.parquet" in hub.files("tester/other", "v1")


def test_bad_token_fails_without_leaking_it(fake_hub: FakeHub, tmp_path: Path) -> None:
    wrong = "hf_" + "WrOnGtOkEn" * 4
    env = _env(fake_hub, HF_TOKEN=wrong, TRACEPIPE_NO_PUSH="1")
    recipe = write_traces_recipe(tmp_path, _outputs({"repo": REPO}), limit=10)
    assert _cli(["run", str(recipe), "--no-progress"], env).returncode == 0
    r = _cli(["push", str(recipe)], env)
    assert r.returncode == 1 and "push failed" in r.stderr and "401" in r.stderr
    _assert_no_token(wrong, tmp_path, [r.stdout, r.stderr])


def test_offline_mode_is_reported(fake_hub: FakeHub, tmp_path: Path) -> None:
    env = _env(fake_hub, TRACEPIPE_NO_PUSH="1")
    recipe = write_traces_recipe(tmp_path, _outputs({"repo": REPO}), limit=10)
    assert _cli(["run", str(recipe), "--no-progress"], env).returncode == 0
    r = _cli(["push", str(recipe)], {**env, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1 and "HF_HUB_OFFLINE" in r.stderr
    assert not _commits(fake_hub)


def test_push_to_directory(tmp_path: Path) -> None:
    from tests.fixtures.outputs_data import run_recipe

    dest = tmp_path / "mirror"
    outputs = _outputs({"url": str(dest)})
    path = write_traces_recipe(tmp_path, outputs, limit=120)
    recipe, result = run_recipe(path)  # pushes after writing
    assert "copied" in result.outputs[0]["push"][0]
    local = sorted(p.name for p in (tmp_path / "out" / "data").glob("*.parquet"))
    assert sorted(p.name for p in (dest / "data").glob("*.parquet")) == local
    assert (dest / "README.md").read_bytes() == (tmp_path / "out" / "README.md").read_bytes()
    from tracepipe.hub import push_outputs

    assert list(push_outputs(recipe)) == [f"url {dest}: 0 file(s) copied, 0 deleted, {len(local) + 6} unchanged"]
    write_traces_recipe(tmp_path, outputs, limit=170)
    recipe, result = run_recipe(path)
    new_local = sorted(p.name for p in (tmp_path / "out" / "data").glob("*.parquet"))
    assert sorted(p.name for p in (dest / "data").glob("*.parquet")) == new_local  # stale shards removed
    for name in new_local:
        assert _sha(dest / "data" / name) == _sha(tmp_path / "out" / "data" / name)
