"""The recipe: pydantic models of ``recipe.yaml`` and errors that name the YAML path and line.

Loading is two-phase: the top level is validated first, then every stage's parameters with the
stage's own ``Params`` model and every engine with its kind's config model, so one report lists
all errors, each as ``recipe.yaml:LINE: stages[2].dedup.method: what was expected``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from tracepipe.engines.base import EngineConfig
from tracepipe.stages.base import StageParams


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
            raise ValueError(f"unknown output format {v!r}; known formats: {', '.join(known_formats())}")
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


class Recipe(_Model):
    name: str = Field(..., description="dataset name; default workdir is .tracepipe/<name>")
    workdir: str | None = Field(None, description="where the store, stats and rejects live")
    source: list[SourceSpec] = Field(..., min_length=1)
    engines: dict[str, dict[str, Any]] = Field(default_factory=dict, description="name -> {kind: vllm|openai|transformers|replay, ...}")
    stages: list[dict[str, dict[str, Any] | None]] = Field(default_factory=list, description="ordered list of {stage-name: {params}}")
    outputs: list[OutputSpec] = Field(default_factory=list)
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)
    max_error_rate: float = Field(0.1, ge=0, le=1, description="the run fails when a stage quarantines more than this share of its rows")
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
@dataclass
class Problem:
    path: str
    line: int | None
    message: str


class RecipeError(Exception):
    """All problems found in a recipe, each with its YAML path and line."""

    def __init__(self, file: str, problems: list[Problem]) -> None:
        self.file = file
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{len(self.problems)} problem(s) in {self.file}:"]
        for p in self.problems:
            loc = f"{self.file}:{p.line}" if p.line else self.file
            lines.append(f"  {loc}: {p.path or '<top>'}: {p.message}")
        return "\n".join(lines)


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
    yaml = YAML(typ="rt")
    try:
        return yaml.load(io.StringIO(text))
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise RecipeError(file, [Problem("", line, f"bad YAML: {e.problem or e}")]) from None


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
    if not p.exists():
        raise RecipeError(file, [Problem("", None, "recipe file not found")])
    text = p.read_text()
    quick = _quick_load(text)
    if isinstance(quick, dict):
        try:
            return validate_tree(quick, file, p.resolve())
        except RecipeError:
            pass
    return validate_tree(parse_yaml(text, file), file, p.resolve())


def validate_tree(tree: Any, file: str, path: Path | None = None) -> Recipe:
    from tracepipe.engines import engine_config_model, known_engine_kinds
    from tracepipe.stages import get_stage, known_stages

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

    stage_specs: list[StageSpec] = []
    for i, entry in enumerate(data.get("stages") or []):
        loc: tuple[Any, ...] = ("stages", i)
        if not isinstance(entry, dict) or len(entry) != 1:
            problems.append(Problem(_fmt_loc(loc), _line_of(tree, loc), "each stage is a mapping with one key: `- stage-name: {params}`"))
            continue
        (name, params), = entry.items()
        try:
            cls = get_stage(name)
        except KeyError:
            problems.append(Problem(_fmt_loc(loc), _line_of(tree, loc), f"unknown stage {name!r}; known stages: {', '.join(known_stages())}"))
            continue
        try:
            stage_specs.append(StageSpec(name=name, params=cls.Params.model_validate(params or {}), index=i))
        except ValidationError as e:
            for err in e.errors():
                full = (*loc, name, *err["loc"])
                problems.append(Problem(_fmt_loc(full), _line_of(tree, full), _describe(err)))

    engine_configs: dict[str, EngineConfig] = {}
    for ename, cfg in (data.get("engines") or {}).items():
        loc = ("engines", ename)
        if not isinstance(cfg, dict) or "kind" not in cfg:
            problems.append(Problem(_fmt_loc(loc), _line_of(tree, loc), f"an engine needs `kind:` ({' | '.join(known_engine_kinds())})"))
            continue
        try:
            model = engine_config_model(str(cfg["kind"]))
        except KeyError as e:
            problems.append(Problem(_fmt_loc((*loc, "kind")), _line_of(tree, (*loc, "kind")), str(e.args[0])))
            continue
        try:
            engine_configs[ename] = model.model_validate(cfg)
        except ValidationError as e:
            for err in e.errors():
                full = (*loc, *err["loc"])
                problems.append(Problem(_fmt_loc(full), _line_of(tree, full), _describe(err)))

    # cross references: engines named by stages exist
    for spec in stage_specs:
        eng = getattr(spec.params, "engine", None)
        for attr in ("engine", "student_engine", "rewriter", "judge_engine"):
            eng = getattr(spec.params, attr, None)
            if isinstance(eng, str) and eng not in (data.get("engines") or {}):
                full = ("stages", spec.index, spec.name, attr)
                problems.append(Problem(_fmt_loc(full), _line_of(tree, full), f"engine {eng!r} is not defined under `engines` (have: {sorted(data.get('engines') or {})})"))

    if recipe is not None and path is not None:
        recipe._path = path
        for i, s in enumerate(recipe.source):
            if s.path and not any(c in s.path for c in "*?[") and "://" not in s.path:
                sp = Path(s.path) if Path(s.path).is_absolute() else path.parent / s.path
                if not sp.exists():
                    loc = ("source", i, "path")
                    problems.append(Problem(_fmt_loc(loc), _line_of(tree, loc), f"no such file: {sp}"))
    if problems:
        raise RecipeError(file, problems)
    assert recipe is not None
    recipe._stage_specs = stage_specs
    recipe._engine_configs = engine_configs
    return recipe


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
