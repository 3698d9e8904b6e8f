"""The recipe: pydantic models of ``recipe.yaml`` and errors that name the YAML path and line.

Loading is two-phase: the top level is validated first, then every stage's parameters with the
stage's own ``Params`` model and every engine with its kind's config model, so one report lists
all errors, each as ``recipe.yaml:LINE: stages[2].dedup.method: what was expected``.
"""

from __future__ import annotations

import difflib
import glob as globlib
import io
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from tracepipe.engines.base import EngineConfig
from tracepipe.errors import Problem, RecipeError  # noqa: F401 - re-exported
from tracepipe.spend import Budget
from tracepipe.stages.base import StageParams


def did_you_mean(word: object, known: list[str]) -> str:
    """``; did you mean 'dedup'?`` (closing an error message) for the known name closest to a
    misspelt one, else ``""``."""
    close = difflib.get_close_matches(str(word), known, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class SourceSpec(_Model):
    """One problem source: a file / glob, or a Hugging Face dataset (hub id or local path)."""

    path: str | None = Field(None, description=".jsonl / .parquet file or glob, relative to the recipe")
    hf: str | None = Field(None, description="Hugging Face dataset id or local dataset directory")
    config: str | None = Field(None, description="Hugging Face dataset config name")
    split: str | None = Field("train", description="Hugging Face dataset split")
    name: str | None = Field(None, description="label stored in the `source` column (default: file stem)")
    preset: str | None = Field(None, description="gsm8k | math | competition | humaneval | mbpp | apps | codecontests | openthoughts")
    columns: dict[str, str] = Field(default_factory=dict, description="canonical column <- source column")
    answer_format: Literal["gsm8k", "boxed", "raw"] | None = Field(None, description="how to read the gold answer")
    domain: str | None = Field(None, description="math | code | any label")
    limit: int | None = Field(None, ge=0, description="read at most this many rows")
    max_row_bytes: int = Field(8 << 20, gt=0, description="a JSONL line longer than this (bytes) is a bad line (default 8 MiB)")
    on_bad_line: Literal["quarantine", "error"] = Field(
        "quarantine",
        description="a bad line (malformed JSON, not UTF-8, problem null or not text, over max_row_bytes): "
        "`quarantine` keeps it aside with its file, line and reason; `error` stops at the first one",
    )

    @model_validator(mode="after")
    def _one_location(self) -> SourceSpec:
        if bool(self.path) == bool(self.hf):
            raise ValueError("give exactly one of `path` or `hf`")
        return self


class PushSpec(_Model):
    repo: str | None = Field(None, description="Hugging Face repo id (org/name)")
    private: bool = True
    revision: str | None = None
    token_env: str = Field("HF_TOKEN", description="name of the environment variable holding the token")
    url: str | None = Field(None, description="push to a directory or fsspec URL instead of the Hub")

    @model_validator(mode="after")
    def _target(self) -> PushSpec:
        if not self.repo and not self.url:
            raise ValueError("give `repo` (Hugging Face Hub) or `url` (directory / fsspec URL)")
        return self


class OutputSpec(_Model):
    format: str = Field("sft-messages", description="sft-messages | prompt-completion | sharegpt | dpo-pairs | opd")
    path: str = Field(..., description="output directory (local path or fsspec URL)")
    shard_size_mb: float = Field(256.0, gt=0, description="target size of one Parquet shard")
    row_group_rows: int = Field(1000, gt=0, description="rows per Parquet row group (streaming readers)")
    test_fraction: float = Field(0.0, ge=0, lt=1, description="held-out split by stable hash of the problem id")
    options: dict[str, Any] = Field(default_factory=dict, description="format-specific options")
    push: PushSpec | None = None

    @field_validator("format")
    @classmethod
    def _known(cls, v: str) -> str:
        from tracepipe.outputs import known_formats

        if v not in known_formats():
            raise ValueError(f"unknown output format {v!r}; known formats: {', '.join(known_formats())}{did_you_mean(v, known_formats())}")
        return v


class ExecutorSpec(_Model):
    kind: Literal["local", "ray"] = "local"
    address: str | None = Field(None, description="Ray cluster address (`auto`, `ray://host:10001`)")
    workers: int | None = Field(None, ge=1, description="processes for CPU-bound row stages (default: all cores)")
    options: dict[str, Any] = Field(default_factory=dict)


class StageSpec(BaseModel):
    """One entry of ``stages``: the stage name, its validated params, and where it came from."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    name: str
    params: StageParams
    index: int
    #: YAML path of its params when not ``stages[index].name`` (a stage another one expands into)
    loc: tuple[Any, ...] = ()


class Recipe(_Model):
    name: str = Field(..., description="dataset name; default workdir is .tracepipe/<name>")
    workdir: str | None = Field(None, description="where the store, stats and rejects live")
    source: list[SourceSpec] = Field(..., min_length=1)
    engines: dict[str, dict[str, Any]] = Field(default_factory=dict, description="name -> {kind: vllm|openai|openai-batch|transformers|replay, ...}")
    stages: list[dict[str, dict[str, Any] | None]] = Field(default_factory=list, description="ordered list of {stage-name: {params}}")
    outputs: list[OutputSpec] = Field(default_factory=list)
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)
    max_error_rate: float = Field(0.1, ge=0, le=1, description="the run fails when a stage quarantines more than this share of its rows")
    budget: Budget | None = Field(None, description="hard limits on every engine together, over the workdir: {max_usd, max_output_tokens, max_requests}")
    description: str | None = None
    license: str | None = None

    @field_validator("source", mode="before")
    @classmethod
    def _as_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v

    # filled by load_recipe
    _path: Path | None = None
    _stage_specs: list[StageSpec] = []
    _engine_configs: dict[str, EngineConfig] = {}

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def base_dir(self) -> Path:
        return self._path.parent if self._path else Path.cwd()

    @property
    def stage_specs(self) -> list[StageSpec]:
        return self._stage_specs

    @property
    def engine_configs(self) -> dict[str, EngineConfig]:
        return self._engine_configs

    def workdir_path(self) -> str:
        wd = self.workdir or f".tracepipe/{self.name}"
        if "://" in wd:
            return wd
        p = Path(wd).expanduser()
        return str(p if p.is_absolute() else (self.base_dir / p).resolve())


# -- errors -----------------------------------------------------------------------------------
def _fmt_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _line_of(node: Any, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest node of ``loc`` present in the ruamel tree."""
    line = None
    cur = node
    for part in loc:
        try:
            if isinstance(cur, CommentedMap) and part in cur:
                line = cur.lc.key(part)[0] + 1
                cur = cur[part]
            elif isinstance(cur, CommentedSeq) and isinstance(part, int) and part < len(cur):
                line = cur.lc.item(part)[0] + 1
                cur = cur[part]
            else:
                break
        except Exception:
            break
    if line is None and hasattr(node, "lc"):
        line = node.lc.line + 1
    return line


def _describe(err: dict[str, Any]) -> str:
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("missing",):
        return "required key is missing"
    if err["type"] == "extra_forbidden":
        return "unknown key (not a parameter here)"
    inp = err.get("input")
    if inp is not None and not isinstance(inp, (dict, list)) and err["type"] not in ("value_error",):
        return f"{msg} (got {inp!r})"
    return msg


def _plain(node: Any) -> Any:
    if isinstance(node, CommentedMap):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, CommentedSeq):
        return [_plain(v) for v in node]
    return node


def parse_yaml(text: str, file: str) -> Any:
    """The round-trip tree of ``text`` (its nodes know their lines); bad YAML is a
    :class:`RecipeError` naming the line."""
    yaml = YAML(typ="rt")
    try:
        return yaml.load(io.StringIO(text))
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise RecipeError(file, [Problem("", line, f"bad YAML: {e.problem or e}")]) from None
    except YAMLError as e:  # e.g. a control character (ReaderError): it knows the offset only
        pos = getattr(e, "position", None)
        line = text.count("\n", 0, pos) + 1 if isinstance(pos, int) else None
        raise RecipeError(file, [Problem("", line, f"bad YAML: {' '.join(str(e).split())}")]) from None


def _quick_load(text: str) -> Any:
    """The recipe as plain data through ruamel's C-backed safe loader (same YAML 1.2 rules as the
    round-trip loader, several times faster), or None when it cannot parse the text."""
    try:
        return YAML(typ="safe", pure=False).load(text)
    except Exception:
        return None


def load_recipe(path: str | Path) -> Recipe:
    """Read, validate and resolve a recipe; raises :class:`RecipeError` listing every problem.

    A valid recipe is read once, by the fast safe loader; any problem sends the text through the
    round-trip loader, whose nodes know their lines, so every problem names its line."""
    p = Path(path)
    file = str(path)
    text = _read_text(p, file)
    quick = _quick_load(text)
    if isinstance(quick, dict):
        try:
            return validate_tree(quick, file, p.resolve())
        except RecipeError:
            pass
    return validate_tree(parse_yaml(text, file), file, p.resolve())


def _read_text(p: Path, file: str) -> str:
    """The recipe's text; a file that is missing, a directory, unreadable or not UTF-8 is a
    :class:`RecipeError` (one line, no traceback)."""
    if not p.exists():
        raise RecipeError(file, [Problem("", None, "recipe file not found")])
    if p.is_dir():
        raise RecipeError(file, [Problem("", None, "is a directory, not a recipe file")])
    try:
        data = p.read_bytes()
    except OSError as e:
        raise RecipeError(file, [Problem("", None, f"cannot read the recipe: {e.strerror or e}")]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise RecipeError(file, [Problem("", line, f"not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})")]) from None


def validate_tree(tree: Any, file: str, path: Path | None = None) -> Recipe:
    """The recipe of a parsed YAML ``tree``; raises :class:`RecipeError` listing every problem
    (top-level keys, each stage's and engine's parameters, cross references, sources)."""
    problems: list[Problem] = []
    if not isinstance(tree, dict):
        raise RecipeError(file, [Problem("", 1, "a recipe is a YAML mapping with `name`, `source`, `stages`, `outputs`")])
    data = _plain(tree)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            problems.append(Problem(_fmt_loc(err["loc"]), _line_of(tree, err["loc"]), _describe(err)))
        recipe = None
    stage_specs = _check_stages(data.get("stages"), tree, problems)
    engines = data.get("engines")
    engine_configs = _check_engines(engines, tree, problems)

    # cross references: engines named by stages exist
    have = sorted(engines) if isinstance(engines, dict) else []
    for spec in stage_specs:
        for attr in ("engine", "student_engine", "rewriter", "judge_engine"):
            eng = getattr(spec.params, attr, None)
            if isinstance(eng, str) and eng not in have:
                full = (*(spec.loc or ("stages", spec.index, spec.name)), attr)
                problems.append(Problem(_fmt_loc(full), _line_of(tree, full), f"engine {eng!r} is not defined under `engines` (have: {have}){did_you_mean(eng, have)}"))

    problems += _source_problems(data.get("source"), tree, path)
    if problems:
        raise RecipeError(file, problems)
    assert recipe is not None
    recipe._path = path
    recipe._stage_specs = stage_specs
    recipe._engine_configs = engine_configs
    return recipe


def _check_stages(stages: Any, tree: Any, problems: list[Problem]) -> list[StageSpec]:
    """Each ``stages`` entry validated by its stage's ``Params``; a misspelt stage name gets the
    closest known one. Problems are appended to ``problems`` (a ``stages`` that is not a list is
    the top-level check's to report)."""
    from tracepipe.stages import get_stage, known_stages

    specs: list[StageSpec] = []
    for i, entry in enumerate(stages if isinstance(stages, list) else []):
        loc: tuple[Any, ...] = ("stages", i)
        if not isinstance(entry, dict) or len(entry) != 1:
            problems.append(Problem(_fmt_loc(loc), _line_of(tree, loc), "each stage is a mapping with one key: `- stage-name: {params}`"))
            continue
        (name, params), = entry.items()
        try:
            cls = get_stage(name)
        except KeyError:
            hint = did_you_mean(name, known_stages())
            problems.append(Problem(_fmt_loc(loc), _line_of(tree, loc), f"unknown stage {name!r}; known stages: {', '.join(known_stages())}{hint}"))
            continue
        try:
            specs.append(StageSpec(name=name, params=cls.Params.model_validate(params or {}), index=i))
        except ValidationError as e:
            for err in e.errors():
                full = (*loc, name, *err["loc"])
                problems.append(Problem(_fmt_loc(full), _line_of(tree, full), _describe(err)))
            continue
        judge = getattr(specs[-1].params, "judge", None) if name == "verify" else None
        if judge is not None:  # `verify: {judge: {...}}` is a `judge` stage right after verify
            specs.append(StageSpec(name="judge", params=judge, index=i, loc=(*loc, name, "judge")))
    return specs


def _check_engines(engines: Any, tree: Any, problems: list[Problem]) -> dict[str, EngineConfig]:
    """Each ``engines`` entry validated by its kind's config model; a misspelt kind gets the
    closest known one. Problems are appended to ``problems``."""
    from tracepipe.engines import engine_config_model, known_engine_kinds

    configs: dict[str, EngineConfig] = {}
    for ename, cfg in (engines if isinstance(engines, dict) else {}).items():
        loc: tuple[Any, ...] = ("engines", ename)
        if not isinstance(cfg, dict) or "kind" not in cfg:
            problems.append(Problem(_fmt_loc(loc), _line_of(tree, loc), f"an engine needs `kind:` ({' | '.join(known_engine_kinds())})"))
            continue
        try:
            model = engine_config_model(str(cfg["kind"]))
        except KeyError:
            kinds = known_engine_kinds()
            msg = f"unknown engine kind {cfg['kind']!r}; known kinds: {', '.join(kinds)}{did_you_mean(cfg['kind'], kinds)}"
            problems.append(Problem(_fmt_loc((*loc, "kind")), _line_of(tree, (*loc, "kind")), msg))
            continue
        try:
            configs[ename] = model.model_validate(cfg)
        except ValidationError as e:
            for err in e.errors():
                full = (*loc, *err["loc"])
                problems.append(Problem(_fmt_loc(full), _line_of(tree, full), _describe(err)))
    return configs


def _source_problems(entries: Any, tree: Any, path: Path | None) -> list[Problem]:
    """Unknown presets (with the closest known one) and, for a recipe read from a file, source
    files that do not exist, in every ``source`` entry that is valid by itself (the others'
    problems are the top-level check's), so they are reported beside any other problem."""
    from tracepipe.sources import PRESETS

    problems = []
    for i, entry in enumerate([entries] if isinstance(entries, dict) else entries if isinstance(entries, list) else []):
        try:
            s = SourceSpec.model_validate(entry)
        except ValidationError:
            continue
        if s.preset and s.preset not in PRESETS:
            loc: tuple[Any, ...] = ("source", i, "preset")
            msg = f"unknown preset {s.preset!r}; known presets: {', '.join(sorted(PRESETS))}{did_you_mean(s.preset, sorted(PRESETS))}"
            problems.append(Problem(_fmt_loc(loc), _line_of(tree, loc), msg))
        if path is None or not s.path or "://" in s.path:
            continue
        sp = Path(s.path) if Path(s.path).is_absolute() else path.parent / s.path
        loc = ("source", i, "path")
        if any(c in s.path for c in "*?["):
            if not globlib.glob(str(sp)):
                problems.append(Problem(_fmt_loc(loc), _line_of(tree, loc), f"no file matches {sp}"))
        elif not sp.exists():
            problems.append(Problem(_fmt_loc(loc), _line_of(tree, loc), f"no such file: {sp}"))
        elif sp.is_dir():
            problems.append(Problem(_fmt_loc(loc), _line_of(tree, loc), f"{sp} is a directory (give a file or a glob such as {s.path.rstrip('/')}/*.jsonl)"))
    return problems


def recipe_json_schema() -> dict[str, Any]:
    """JSON Schema of the recipe, with every registered stage's and engine's parameters."""
    from tracepipe.engines import engine_config_model, known_engine_kinds
    from tracepipe.stages import get_stage, known_stages

    schema = Recipe.model_json_schema()
    defs = schema.setdefault("$defs", {})
    stage_items = []
    for name in known_stages():
        params = get_stage(name).Params.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(params.pop("$defs", {}))
        title = f"stage_{name}"
        defs[title] = params
        stage_items.append({
            "type": "object",
            "properties": {name: {"anyOf": [{"$ref": f"#/$defs/{title}"}, {"type": "null"}]}},
            "required": [name],
            "additionalProperties": False,
        })
    schema["properties"]["stages"] = {"type": "array", "items": {"oneOf": stage_items}}
    engine_items = []
    for kind in known_engine_kinds():
        es = engine_config_model(kind).model_json_schema(ref_template="#/$defs/{model}")
        defs.update(es.pop("$defs", {}))
        defs[f"engine_{kind}"] = es
        engine_items.append({"$ref": f"#/$defs/engine_{kind}"})
    if engine_items:
        schema["properties"]["engines"] = {"type": "object", "additionalProperties": {"anyOf": engine_items}}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "tracepipe recipe"
    return schema
