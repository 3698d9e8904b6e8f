"""Command line: ``tracepipe run | plan | status | validate | schema | init | report | push``.

Exit codes: 0 ok, 1 run failed, 2 bad recipe or usage.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from tracepipe.contract import ERROR_COL, REASON_COL
from tracepipe.errors import BadSourceLine, RecipeError, RunFailed, SourceError
from tracepipe.recipe import Recipe, load_recipe

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Build reasoning-trace datasets from one recipe.")
console = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 160)
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _load(path: Path) -> Recipe:
    try:
        return load_recipe(path)
    except RecipeError as e:
        console.print(e.render(), style="red", highlight=False, markup=False)
        raise typer.Exit(EXIT_USAGE) from None


@contextmanager
def _input_errors(verb: str, os_exit: int = EXIT_FAILED) -> Iterator[None]:
    """Bad input ends the command with a short message, no traceback: a bad source line under
    ``on_bad_line: error`` (``file:LINE: reason``) exits 1; a source that cannot be read as the
    recipe says (no file matches, a column that is not there, ...) exits 2; a file or folder
    that cannot be written or read (a workdir under a missing or read-only folder) exits
    ``os_exit``."""
    try:
        yield
    except BadSourceLine as e:
        console.print(f"{verb} failed: bad source line (on_bad_line: error):\n{e}", style="red", markup=False, highlight=False)
        raise typer.Exit(EXIT_FAILED) from None
    except SourceError as e:
        console.print(f"{verb} failed: {e}", style="red", markup=False, highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    except OSError as e:
        what = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)
        console.print(f"{verb} failed: {what}", style="red", markup=False, highlight=False)
        raise typer.Exit(os_exit) from None


def _apply_executor(recipe: Recipe, executor: str | None, workers: int | None) -> None:
    if executor:
        recipe.executor.kind = executor  # type: ignore[assignment]
    if workers:
        recipe.executor.workers = workers


def _stage_table(stats: dict[str, Any], plan: bool) -> Table:
    t = Table(title=("plan: " if plan else "run: ") + stats["recipe"], show_lines=False)
    t.add_column("#", justify="right")
    t.add_column("stage")
    t.add_column("kind")
    t.add_column("rows in", justify="right")
    t.add_column("cached", justify="right")
    t.add_column("to compute" if plan else "computed", justify="right")
    t.add_column("rows out", justify="right")
    if not plan:
        t.add_column("dropped", justify="left")
        t.add_column("errors", justify="right")
        t.add_column("s", justify="right")
        t.add_column("rows/s", justify="right")
    for s in stats["stages"]:
        todo = s["to_compute"] if plan else s["computed"]
        mark = "+" if plan and s.get("upstream_pending") else ""
        row = [str(s["index"]), s["name"], s["kind"], f"{s['rows_in']}{mark}", str(s["cached"]), f"{todo}{mark}", str(s["rows_out"])]
        if not plan:
            drops = ", ".join(f"{r}: {n}" for r, n in sorted(s["dropped"].items(), key=lambda kv: -kv[1])[:4])
            row += [drops, str(s["errors"]), f"{s['seconds']:.2f}", f"{s['rows_per_s']:.1f}"]
        t.add_row(*row)
    return t


def _num(v: Any, money: bool = False) -> str:
    if v is None:
        return "-"
    return f"${v:,.4f}" if money else f"{v:,.0f}" if isinstance(v, (int, float)) and float(v).is_integer() else f"{v:,.2f}"


def _estimate_table(stats: dict[str, Any]) -> Table | None:
    """Plan: per model stage, requests, tokens, cost and GPU-hours (pipeline/estimate.py)."""
    rows = [s for s in stats["stages"] if s.get("estimate")]
    if not rows:
        return None
    t = Table(title="estimates over the rows to compute ('+': an earlier stage still has work; CPU stages "
                    "that have not run count as keeping every row)")
    for name, justify in (("#", "right"), ("stage", "left"), ("engine", "left"), ("requests", "right"),
                          ("prompt tokens", "right"), ("completion tokens: median / p90 / max", "right"),
                          ("USD: median / p90 / max", "right"), ("GPU-hours: median / max", "right")):
        t.add_column(name, justify=justify)  # type: ignore[arg-type]
    for s in rows:
        e = s["estimate"]
        mark = "+" if e.get("partial") else ""
        comp = e.get("completion_tokens") or {}
        usd = e.get("usd")
        gpu = e.get("gpu_hours")
        prompt = _num(e.get("prompt_tokens")) + ("~" if e.get("prompt_tokens_method", "tokenizer") not in ("tokenizer", "token ids") else "")
        t.add_row(
            str(s["index"]), s["name"], f"{e['engine']} ({e['kind']})", f"{_num(e.get('requests'))}{mark}", prompt,
            " / ".join(_num(comp.get(k)) for k in ("median", "p90", "max")) if comp else "-",
            " / ".join(_num(usd.get(k), money=True) for k in ("median", "p90", "max")) if usd else "no price",
            " / ".join("-" if gpu.get(k) is None else f"{gpu[k]:.3g}" for k in ("median", "max")) if gpu
            else ("no earlier run" if "gpu_hours" in e else "-"),
        )
    return t


def _spend_lines(spend: dict[str, Any]) -> list[str]:
    """Plan: what the workdir has spent, and each budget against it plus the estimates."""
    lines = []
    w = spend.get("workdir") or {}
    if w.get("requests"):
        lines.append(f"spent so far in this workdir: ${w['usd']:,.4f} ({w['requests']:,} requests, "
                     f"{w['prompt_tokens']:,} prompt + {w['completion_tokens']:,} completion tokens)")
    for o in spend.get("outlook") or []:
        money = o["limit"] == "max_usd"
        planned = " / ".join(_num(o.get(k), money) for k in ("planned_median", "planned_max"))
        lines.append(f"budget of {o['scope']}: {o['limit']} {o['value']:g}; spent {_num(o['spent'], money)}, "
                     f"this plan {planned} (median / max): {o['verdict']}")
    return lines


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="recipe.yaml"),
    executor: str | None = typer.Option(None, "--executor", help="local | ray (overrides the recipe)"),
    workers: int | None = typer.Option(None, "--workers", help="processes for CPU-bound stages"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="live progress bars"),
    as_json: bool = typer.Option(False, "--json", help="print the run stats as JSON on stdout"),
) -> None:
    """Run the recipe; only rows and stages missing from the store are computed."""
    from tracepipe.pipeline.runner import Runner

    r = _load(recipe)
    _apply_executor(r, executor, workers)
    try:
        with _input_errors("run"):
            result = Runner(r, progress=progress and sys.stderr.isatty(), console=console).run()
    except RunFailed as e:
        console.print(f"run failed: {e}", style="red", markup=False, highlight=False)
        raise typer.Exit(EXIT_FAILED) from None
    stats = result.stats.to_dict()
    if as_json:
        out.print_json(json.dumps(stats, default=str))
    else:
        console.print(_stage_table(stats, plan=False))
        for o in stats["outputs"]:
            console.print(f"wrote {o['format']} to {o['path']}: {o['rows']}", markup=False)
            for line in o.get("push", []) or []:
                console.print(f"  {line}", markup=False)
        console.print(f"done in {stats['seconds']:.1f}s; stats in {r.workdir_path()}/stats.json")


@app.command()
def plan(
    recipe: Path = typer.Argument(..., help="recipe.yaml"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON on stdout"),
) -> None:
    """Per stage: rows cached / rows to compute; per model stage: requests, tokens, cost and
    GPU-hours. Sends nothing and starts no engine ('+' = an earlier stage has work)."""
    from tracepipe.pipeline.runner import Runner

    r = _load(recipe)
    try:
        with _input_errors("plan"):
            stats = Runner(r).plan().to_dict()
    except RunFailed as e:
        console.print(f"plan failed: {e}", style="red", markup=False)
        raise typer.Exit(EXIT_FAILED) from None
    if as_json:
        out.print_json(json.dumps(stats, default=str))
    else:
        out.print(_stage_table(stats, plan=True))
        est = _estimate_table(stats)
        if est is not None:
            out.print(est)
        for line in _spend_lines(stats.get("spend") or {}):
            out.print(line, markup=False, highlight=False)


@app.command()
def status(
    recipe: Path = typer.Argument(..., help="recipe.yaml"),
    as_json: bool = typer.Option(False, "--json", help="JSON on stdout"),
) -> None:
    """What the last run did, and the rejected / quarantined rows kept in the workdir."""
    import polars as pl

    r = _load(recipe)
    wd = Path(r.workdir_path())
    stats_file = wd / "stats.json"
    info: dict[str, Any] = {"workdir": str(wd), "last_run": None, "rejects": {}, "quarantine": {}}
    if stats_file.exists():
        try:
            info["last_run"] = json.loads(stats_file.read_text())
        except (OSError, ValueError) as e:  # damaged by hand or a full disk: say so, show the rest
            console.print(f"cannot read {stats_file}: {e}", style="yellow", markup=False, highlight=False)
    for kind in ("rejects", "quarantine"):
        d = wd / kind
        col = REASON_COL if kind == "rejects" else ERROR_COL
        groups: dict[str, list[str]] = {}
        for f in sorted(d.glob("*.parquet")) if d.exists() else []:
            # rejects come one file per frame part: <NNN>-<stage>-<k>.parquet
            tag, _, k = f.stem.rpartition("-")
            groups.setdefault(tag if kind == "rejects" and k.isdigit() and tag else f.stem, []).append(str(f))
        for tag, paths in groups.items():
            df = pl.concat([pl.read_parquet(p, columns=[col]) for p in paths], how="vertical_relaxed")
            info[kind][tag] = {"rows": df.height, "by_reason": dict(df[col].value_counts(sort=True).head(10).iter_rows())}
    if as_json:
        out.print_json(json.dumps(info, default=str))
        return
    if info["last_run"] is None:
        out.print(f"no run yet in {wd}")
    else:
        lr = info["last_run"]
        out.print(f"last run {lr['run_id']}: {'ok' if lr['ok'] else 'FAILED: ' + str(lr['error'])} in {lr['seconds']}s")
        out.print(_stage_table(lr, plan=False))
    for kind in ("rejects", "quarantine"):
        for name, d in info[kind].items():
            out.print(f"{kind}/{name}{'-*' if kind == 'rejects' else ''}.parquet: {d['rows']} rows  {d['by_reason']}", markup=False)


@app.command()
def validate(recipe: Path = typer.Argument(..., help="recipe.yaml")) -> None:
    """Check the recipe (every error with its YAML path and line); runs nothing."""
    r = _load(recipe)
    out.print(f"ok: {recipe}: {len(r.source)} source(s), {len(r.stage_specs)} stage(s), {len(r.outputs)} output(s)")


@app.command()
def schema(output: Path | None = typer.Option(None, "--output", "-o", help="write to a file")) -> None:
    """JSON Schema of recipes (for editor completion)."""
    from tracepipe.recipe import recipe_json_schema

    text = json.dumps(recipe_json_schema(), indent=2)
    if output:
        with _input_errors("schema", os_exit=EXIT_USAGE):
            output.write_text(text)
        console.print(f"wrote {output}")
    else:
        print(text)


STARTER = """\
# tracepipe recipe: `tracepipe run {path}`
# yaml-language-server: $schema=recipe.schema.json
name: {name}
source:
  - path: problems.jsonl            # .jsonl / .parquet / glob, or `hf: org/dataset`
    columns: {{problem: question, answer: answer}}
    answer_format: gsm8k            # gsm8k | boxed | raw
    domain: math
engines:
  teacher:
    kind: vllm
    model: deepseek-ai/DeepSeek-R1-Distill-Qwen-7B
    max_model_len: 32768
stages:
  - decontaminate: {{benchmarks: [math500, aime24, amc23, gsm8k_test]}}
  - dedup: {{method: exact}}
  - generate: {{engine: teacher, n: 4, temperature: 0.6, top_p: 0.95, max_tokens: 16384}}
  - verify: {{}}
  - filter: {{where: "verdict = 'correct'"}}
outputs:
  - format: sft-messages
    path: out/{name}
"""


@app.command()
def init(
    path: Path = typer.Argument(Path("recipe.yaml"), help="where to write the starter recipe"),
    name: str = typer.Option("my-dataset", help="dataset name"),
    force: bool = typer.Option(False, help="overwrite an existing file"),
) -> None:
    """Write a starter recipe."""
    if path.exists() and not force:
        console.print(f"{path} exists; use --force to overwrite", style="red")
        raise typer.Exit(EXIT_USAGE)
    with _input_errors("init", os_exit=EXIT_USAGE):
        path.write_text(STARTER.format(path=path, name=name))
    out.print(f"wrote {path}")


@app.command()
def report(
    recipe: Path = typer.Argument(..., help="recipe.yaml"),
    output: Path | None = typer.Option(None, "--output", "-o", help="directory for report.html and plots"),
    browser_rows: int = typer.Option(10_000, min=1, help="trace browser: rows embedded (a stable sample beyond)"),
    browser_mb: float = typer.Option(24.0, min=0.1, help="trace browser: megabytes of text embedded (longer texts are cut)"),
) -> None:
    """HTML report with PNG plots of the last run and a trace browser over its rows."""
    from tracepipe._browser import Limits
    from tracepipe.report import build_report

    r = _load(recipe)
    with _input_errors("report"):
        path = build_report(r, output, browser_limits=Limits(rows=browser_rows, mb=browser_mb))
    out.print(f"wrote {path}")


@app.command()
def push(
    recipe: Path = typer.Argument(..., help="recipe.yaml"),
    repo: str | None = typer.Option(None, help="override outputs[].push.repo"),
) -> None:
    """Push the outputs to the Hugging Face Hub (or outputs[].push.url)."""
    from tracepipe.hub import push_outputs

    r = _load(recipe)
    try:
        for line in push_outputs(r, repo=repo):
            out.print(line)
    except Exception as e:  # the message never contains the token (hub.py scrubs it)
        console.print(f"push failed: {e}", style="red", markup=False)
        raise typer.Exit(EXIT_FAILED) from None


def main() -> None:
    try:
        app()
    except SystemExit as e:
        # click reports usage errors with exit code 2 already; keep it
        raise e


if __name__ == "__main__":
    main()
