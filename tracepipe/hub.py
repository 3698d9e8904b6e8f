"""Push written outputs to the Hugging Face Hub, a directory, or any fsspec URL.

Hub (``outputs[].push: {repo, private, revision, token_env}``):

- the dataset repo is created if needed (``private`` by default), and the branch if ``revision``
  names one that does not exist yet;
- the remote file list is read (``list_repo_tree``) and compared with the local files: LFS files
  (shards, plots) by sha256 (the LFS oid), regular files by git blob sha1;
- ONE ``create_commit`` carries the shards, card, plots and recipe that changed, and deletes
  stale shards (``data/`` files the new output no longer has), so a re-push after adding rows
  uploads only the shards whose bytes changed (the writer makes shards byte-stable);
- the token comes from the environment variable ``token_env`` (default ``HF_TOKEN``), else from
  the cached ``huggingface-cli login``; it is never logged, printed or written, and error messages
  are scrubbed of it.

Directory / fsspec URL (``push: {url: ...}``): the same diff against a manifest of sha256 sums
kept at ``<url>/.tracepipe-manifest.json``; changed files are copied, stale shards removed.

This module reads written output directories; it never imports the writer (``tracepipe.outputs``).
After a run, :func:`tracepipe.publish.publish` calls :func:`push_output` with the run's
:class:`~tracepipe.secrets.Scrubber`; ``tracepipe push`` calls :func:`push_outputs`, which makes one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tracepipe.errors import PushError
from tracepipe.locations import output_location
from tracepipe.secrets import Scrubber

#: top-level files pushed next to ``data/`` (bookkeeping files with local paths stay local)
PUSHED_TOP = ("README.md", "recipe.yaml", "summary.json", "dataset_info.json", "token_lengths.png", "difficulty.png",
              "browser.html")
MANIFEST = ".tracepipe-manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file (what the Hub reports for non-LFS files)."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def local_files(out: Path) -> dict[str, Path]:
    """``path in repo -> local file`` for one written output directory."""
    if not (out / "output.json").exists():
        raise PushError(f"no output written at {out} (no output.json): run `tracepipe run` first")
    files = {f"data/{p.name}": p for p in sorted((out / "data").glob("*.parquet"))}
    if not files:
        raise PushError(f"no shards under {out}/data")
    for name in PUSHED_TOP:
        if (out / name).is_file():
            files[name] = out / name
    return files


def _stale(remote: set[str], local: set[str]) -> list[str]:
    """Remote files this tool owns that the new output no longer has (shards, plots)."""
    return sorted(p for p in remote - local if p.startswith("data/") or p in PUSHED_TOP)


# -- Hugging Face Hub -----------------------------------------------------------------------------
def _remote_tree(api: Any, repo_id: str, revision: str | None) -> dict[str, Any]:
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError
    from huggingface_hub.hf_api import RepoFile

    try:
        return {f.path: f for f in api.list_repo_tree(repo_id, repo_type="dataset", revision=revision, recursive=True)
                if isinstance(f, RepoFile)}
    except (RevisionNotFoundError, EntryNotFoundError):
        return {}


def _unchanged(remote: Any, local: Path) -> bool:
    if remote is None or remote.size != local.stat().st_size:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == sha256_file(local)
    return remote.blob_id == git_blob_sha1(local)


def push_to_hub(out: Path, repo_id: str, push: Any, recipe_name: str, scrubber: Scrubber | None = None) -> Iterator[str]:
    """Push one output directory to a Hub dataset repo in one commit; yields progress lines.

    Errors are :class:`PushError` with the message scrubbed (``scrubber``, plus the token)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants

    import tracepipe

    token = os.environ.get(push.token_env) or None  # None: huggingface_hub's cached login / HF_TOKEN
    hide = (scrubber or Scrubber()).with_values(token)
    try:
        if constants.HF_HUB_OFFLINE:
            raise PushError("HF_HUB_OFFLINE is set: unset it to push to the Hub")
        files = local_files(out)
        api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token,
                    library_name="tracepipe", library_version=tracepipe.__version__)
        api.create_repo(repo_id, repo_type="dataset", private=push.private, exist_ok=True)
        revision = push.revision
        if revision and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, repo_type="dataset", branch=revision, exist_ok=True)
        remote = _remote_tree(api, repo_id, revision)
        remote_contents = {f.lfs.sha256 for f in remote.values() if f.lfs is not None}
        adds, same, moved = [], 0, 0
        for path, local in files.items():
            if _unchanged(remote.get(path), local):
                same += 1
                continue
            op = CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(local))
            if op.upload_info.sha256.hex() in remote_contents:
                moved += 1  # same bytes under a new name (shard count changed): no upload, just a ref
            adds.append(op)
        deletes = [CommitOperationDelete(path_in_repo=p) for p in _stale(set(remote), set(files))]
        where = f"{repo_id}@{revision or constants.DEFAULT_REVISION}"
        if not adds and not deletes:
            yield f"hub {where}: up to date ({same} file(s) unchanged)"
            return
        info = api.create_commit(
            repo_id, adds + deletes, repo_type="dataset", revision=revision,
            commit_message=f"tracepipe: {recipe_name} ({len(adds)} added or changed, {len(deletes)} deleted)",
        )
        yield (f"hub {where}: {len(adds)} file(s) added or changed ({len(adds) - moved} with new content, "
               f"{moved} renamed with known content), {len(deletes)} deleted, {same} unchanged; commit {info.oid[:12]}")
    except PushError as e:
        raise PushError(hide.text(str(e))) from None
    except Exception as e:
        raise PushError(f"push to {repo_id} failed: {hide.text(f'{type(e).__name__}: {e}')}") from None


# -- directory / fsspec URL -----------------------------------------------------------------------
def push_to_url(out: Path, url: str) -> Iterator[str]:
    """Copy one output directory to a directory or fsspec URL, changed files only; yields lines."""
    import fsspec

    files = local_files(out)
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    manifest_path = f"{root}/{MANIFEST}"
    try:
        remote: dict[str, str] = json.loads(fs.cat_file(manifest_path)) if fs.exists(manifest_path) else {}
    except ValueError:
        remote = {}
    sums = {p: sha256_file(f) for p, f in files.items()}
    uploaded = same = 0
    for path, local in files.items():
        dest = f"{root}/{path}"
        if remote.get(path) == sums[path] and fs.exists(dest):
            same += 1
            continue
        fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(local), dest + ".tmp")
        fs.mv(dest + ".tmp", dest)
        uploaded += 1
    existing = set(remote)
    if fs.exists(f"{root}/data"):
        existing |= {f"data/{p.rsplit('/', 1)[-1]}" for p in fs.ls(f"{root}/data", detail=False)}
    stale = _stale(existing, set(files))
    for p in stale:
        if fs.exists(f"{root}/{p}"):
            fs.rm(f"{root}/{p}")
    with fs.open(manifest_path, "w") as fh:
        fh.write(json.dumps(sums, indent=2, sort_keys=True))
    yield f"url {url}: {uploaded} file(s) copied, {len(stale)} deleted, {same} unchanged"


# -- entry points -----------------------------------------------------------------------------------
def _output_dir(recipe: Any, spec: Any) -> Path:
    loc = output_location(recipe, spec)
    if "://" in loc:
        raise PushError(f"output {spec.path!r} is not a local directory: push it from a local output path")
    return Path(loc)


def push_output(recipe: Any, spec: Any, repo: str | None = None, scrubber: Scrubber | None = None) -> Iterator[str]:
    """Push one written ``outputs[i]`` to its ``push`` target (``repo`` overrides the Hub repo).

    ``scrubber``: the secrets to keep out of error messages (default: the recipe's)."""
    from tracepipe.recipe import PushSpec

    push = spec.push
    if repo:
        push = (push.model_copy(update={"repo": repo, "url": None}) if push is not None else PushSpec(repo=repo))
    if push is None:
        raise PushError(f"output {spec.path!r} has no `push:` and no --repo was given")
    out = _output_dir(recipe, spec)
    if push.url:
        yield from push_to_url(out, push.url)
    else:
        assert push.repo
        yield from push_to_hub(out, push.repo, push, recipe.name, scrubber or Scrubber.for_recipe(recipe))


def push_outputs(recipe: Any, repo: str | None = None) -> Iterator[str]:
    """Push every output that has ``push:`` (or, with ``repo``, the one output) of a recipe."""
    targets = [o for o in recipe.outputs if o.push is not None]
    if repo:
        targets = targets or list(recipe.outputs)
        if len(targets) != 1:
            raise PushError(f"--repo names one repo but the recipe has {len(targets)} outputs to push; set outputs[].push.repo instead")
    if not targets:
        raise PushError("no output has `push:` in the recipe; add `push: {repo: org/name}` or pass --repo")
    scrubber = Scrubber.for_recipe(recipe)
    for spec in targets:
        yield from push_output(recipe, spec, repo=repo, scrubber=scrubber)
