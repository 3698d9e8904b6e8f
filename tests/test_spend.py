"""Spend under control: estimates in ``tracepipe plan``, hard budgets, spend in stats, card and report.

Against :class:`TokenizingServer` (tests/fixtures/usage_server.py): a local OpenAI-compatible
server that answers deterministically and reports ``usage`` as a real server counts it (the
tiny model's chat template applied by ``transformers``), through the real ``openai`` engine and
the CLI. Requests are identified at the server by (messages, seed): one sample of one problem.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from tests.fixtures.recipes import GSM8K_TRAIN, cli, plan_json
from tests.fixtures.usage_server import TokenizingServer
from tracepipe.errors import BudgetExceeded
from tracepipe.spend import Budget, Price, SpendBook, read_ledger

KEY_ENV, KEY = "TP_SPEND_TEST_KEY", "sk-spend-4f1c9e0b7a2d4c6e8f10"
PRICE = {"input_per_mtok": 100.0, "output_per_mtok": 1000.0}  # high, so a few requests cost cents
N, MAX_TOKENS = 2, 8


@pytest.fixture
def server(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv(KEY_ENV, KEY)
    with TokenizingServer(tiny_model_dir, model_id="teacher", require_key=KEY, delay=0.02) as srv:
        yield srv


def recipe(tmp: Path, name: str, base_url: str, tok: Path, rows: int, top: dict[str, Any] | None = None, **engine: Any) -> Path:
    r = {
        "name": name,
        "workdir": str(tmp / name / "work"),
        "source": [{"path": str(GSM8K_TRAIN), "preset": "gsm8k", "limit": rows}],
        "engines": {"api": {
            "kind": "openai", "base_url": base_url, "model": "teacher", "api_key_env": KEY_ENV, "concurrency": 3,
            "fingerprint": "teacher-v1", "tokenizer": str(tok), "price": PRICE, "backoff": {"base": 0.05, "max": 0.2},
            **engine,
        }},
        "stages": [{"generate": {"engine": "api", "n": N, "temperature": 0.7, "max_tokens": MAX_TOKENS, "batch_size": 4}}],
        "outputs": [{"format": "sft-messages", "path": str(tmp / name / "out")}],
        **(top or {}),
    }
    p = tmp / name / "recipe.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(r, sort_keys=False))
    return p


def request_id(body: dict[str, Any]) -> tuple[str, int]:
    return json.dumps(body["messages"], sort_keys=True), int(body["seed"])


def answered(srv: TokenizingServer, start: int = 0) -> list[Any]:
    return [s for s in srv.chat_requests()[start:] if s.status == 200 and s.response is not None]


def billed(seen: list[Any]) -> tuple[int, int, float]:
    """Prompt tokens, completion tokens and USD the server's ``usage`` says for these answers."""
    p = sum(s.response["usage"]["prompt_tokens"] for s in seen)
    c = sum(s.response["usage"]["completion_tokens"] for s in seen)
    return p, c, (p * PRICE["input_per_mtok"] + c * PRICE["output_per_mtok"]) / 1e6


def store_rows(workdir: Path) -> pl.DataFrame:
    files = sorted(workdir.glob("stages/generate-*/part-*.parquet"))
    return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed") if files else pl.DataFrame()


def test_estimates_match_what_the_server_bills(tmp_path: Path, server: TokenizingServer, tiny_model_dir: Path) -> None:
    path = recipe(tmp_path, "est", server.base_url, tiny_model_dir, rows=12)
    est = plan_json(path)["stages"][0]["estimate"]
    assert server.chat_requests() == []  # planning sends nothing
    assert est["requests"] == 12 * N and est["samples"] == 12 * N and est["prompt_tokens_method"] == "tokenizer"
    assert est["completion_tokens"] == {"max": 12 * N * MAX_TOKENS, "median": None, "p90": None}  # nothing in the store yet

    res = cli("run", str(path), "--no-progress")
    assert res.exit_code == 0, res.output
    seen = answered(server)
    assert len(seen) == est["requests"]
    prompt, completion, usd = billed(seen)
    assert abs(est["prompt_tokens"] - prompt) <= 0.01 * prompt  # within 1% of what the server counted
    assert completion <= est["completion_tokens"]["max"]
    assert est["usd"]["max"] == pytest.approx((est["prompt_tokens"] * 100 + 12 * N * MAX_TOKENS * 1000) / 1e6)
    # the run's stats hold the spend the server reported, priced
    stats = json.loads((tmp_path / "est" / "work" / "stats.json").read_text())
    spend = stats["spend"]["engines"]["api"]
    assert spend["run"] == {"requests": 12 * N, "prompt_tokens": prompt, "completion_tokens": completion, "usd": pytest.approx(usd)}
    assert spend["workdir"] == spend["run"]
    assert read_ledger(tmp_path / "est" / "work")["api"].usd == pytest.approx(usd)

    # more problems: the new ones are estimated from the completions already in the store
    more = recipe(tmp_path, "est", server.base_url, tiny_model_dir, rows=20)
    est2 = plan_json(more)["stages"][0]["estimate"]
    assert est2["requests"] == 8 * N
    done = store_rows(tmp_path / "est" / "work")["completion_tokens"].cast(pl.Float64)
    med, p90 = done.median(), done.quantile(0.9, interpolation="linear")
    assert est2["completion_tokens"]["per_sample"]["median"] == med and est2["completion_tokens"]["per_sample"]["rows"] == 12 * N
    assert est2["completion_tokens"]["median"] == round(8 * N * min(med, MAX_TOKENS))
    assert est2["completion_tokens"]["p90"] == round(8 * N * min(p90, MAX_TOKENS))
    assert est2["usd"]["median"] == pytest.approx((est2["prompt_tokens"] * 100 + est2["completion_tokens"]["median"] * 1000) / 1e6)
    res = cli("plan", str(more))  # the table
    assert res.exit_code == 0 and "estimates" in res.stdout and f"{est2['prompt_tokens']:,}" in res.stdout
    assert f"${spend['workdir']['usd']:,.4f}" in res.stdout  # spent so far in this workdir


def test_budget_stop_commits_what_was_in_flight_and_a_rerun_repeats_nothing(
    tmp_path: Path, server: TokenizingServer, tiny_model_dir: Path,
) -> None:
    rows, max_usd = 16, 0.12
    path = recipe(tmp_path, "b", server.base_url, tiny_model_dir, rows=rows, budget={"max_usd": max_usd})
    workdir = tmp_path / "b" / "work"
    res = cli("run", str(path), "--no-progress")
    assert res.exit_code == 1, res.output
    msg = res.output
    assert "budget of engine 'api' reached (max_usd: 0.12" in msg and "Raise the `budget`" in msg
    run1 = answered(server)
    prompt, completion, usd = billed(run1)
    assert 0 < usd <= max_usd  # never crossed
    assert f"Spent ${usd:,.4f} ({len(run1):,} requests, {prompt:,} prompt + {completion:,} completion tokens) in this workdir" in msg
    # the store is consistent: whole rows (every sample), each once; what remains is said
    done = store_rows(workdir)
    assert done.height and not done.select("_in_key", "_idx").is_duplicated().any()
    per_key = Counter(done["_in_key"].to_list())
    assert set(per_key.values()) == {N}
    remaining = int(re.search(r"(\d+) of (\d+) rows of this stage remain", msg).group(1))  # type: ignore[union-attr]
    assert remaining == rows - len(per_key) > 0
    # every answered request is committed or kept in the engine's journal (paid once, never lost)
    journaled = [ln for f in workdir.glob("engines/openai-*/journal-*.jsonl") for ln in f.read_text().splitlines() if '"k"' in ln]
    assert len(journaled) == len(run1) - done.height
    stats = json.loads((workdir / "stats.json").read_text())
    assert stats["ok"] is False and stats["spend"]["engines"]["api"]["workdir"]["usd"] == pytest.approx(usd)
    assert stats["spend"]["stopped"].startswith("budget of engine 'api' reached")

    # the same budget again: it stops again and still never crosses it (under a budget a call
    # holds one row, so a row with a shorter prompt may still fit where the refused one did not)
    res = cli("run", str(path), "--no-progress")
    assert res.exit_code == 1, res.output
    run1 = answered(server)
    assert billed(run1)[2] <= max_usd
    n1 = len(server.chat_requests())

    # a raised budget: the run finishes; no request is sent twice over the two runs
    path = recipe(tmp_path, "b", server.base_url, tiny_model_dir, rows=rows, budget={"max_usd": 10.0})
    res = cli("run", str(path), "--no-progress")
    assert res.exit_code == 0, res.output
    run2 = answered(server, n1)
    ids = Counter(request_id(s.body) for s in run1 + run2)
    assert len(ids) == rows * N and max(ids.values()) == 1
    # spend summed over both runs, as the server billed it
    p_all, c_all, usd_all = billed(run1 + run2)
    assert read_ledger(workdir)["api"].usd == pytest.approx(usd_all)
    final = json.loads((workdir / "stats.json").read_text())["spend"]["engines"]["api"]
    assert final["workdir"] == {"requests": rows * N, "prompt_tokens": p_all, "completion_tokens": c_all, "usd": pytest.approx(usd_all)}
    assert final["run"]["requests"] == len(run2)
    # the card and the report show it
    card = (tmp_path / "b" / "out" / "README.md").read_text()
    assert "## Spend" in card and f"${usd_all:,.4f}" in card
    report = cli("report", str(path))
    assert report.exit_code == 0, report.output
    html = (workdir / "report" / "report.html").read_text()
    assert 'id="spend"' in html and f"${usd_all:.4f}" in html and 'id="spend-runs"' in html

    # identical to a run without a budget in a fresh workdir
    fresh = recipe(tmp_path, "fresh", server.base_url, tiny_model_dir, rows=rows)
    assert cli("run", str(fresh), "--no-progress").exit_code == 0
    cols = ["id", "sample", "messages", "reasoning", "response", "prompt_tokens", "completion_tokens"]
    a, b = (pl.read_parquet(tmp_path / n / "out" / "data" / "*.parquet") for n in ("b", "fresh"))
    key = ["id"] + (["sample"] if "sample" in a.columns else [])
    assert a.select([c for c in cols if c in a.columns]).sort(key).equals(b.select([c for c in cols if c in b.columns]).sort(key))

    # no key anywhere: files of both workdirs and outputs, and what the CLI printed
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f
    assert KEY not in msg


def test_recipe_budget_on_requests_holds_across_runs(tmp_path: Path, server: TokenizingServer, tiny_model_dir: Path) -> None:
    path = recipe(tmp_path, "r", server.base_url, tiny_model_dir, rows=10, top={"budget": {"max_requests": 7}})
    res = cli("run", str(path), "--no-progress")
    assert res.exit_code == 1 and "budget of the recipe reached (max_requests: 7" in res.output
    assert len(answered(server)) == 7  # every request reserved was sent; the 8th was not
    done = store_rows(tmp_path / "r" / "work")
    assert done.height <= 7 and set(Counter(done["_in_key"].to_list()).values()) <= {N}
    plan = plan_json(path)
    outlook = plan["spend"]["outlook"]
    assert outlook == [{"scope": "the recipe", "limit": "max_requests", "value": 7, "spent": float(len(answered(server))),
                        "planned_max": float(plan["stages"][0]["estimate"]["requests"]),
                        "planned_median": float(plan["stages"][0]["estimate"]["requests"]), "verdict": "will stop"}]


def test_spend_book_gate_never_crosses_and_refuses_after_a_stop() -> None:
    book = SpendBook(None, budget=Budget(max_output_tokens=100))
    m = book.meter("e", Price(input_per_mtok=1, output_per_mtok=2), Budget(max_usd=1.0))
    held = [m.reserve(1, 10, 40), m.reserve(1, 10, 40)]  # 80 completion tokens reserved
    with pytest.raises(BudgetExceeded, match="the recipe reached .max_output_tokens: 100"):
        m.reserve(1, 10, 40)  # 120 > 100 could cross
    held[0].release()
    m.charge(1, 10, 5)  # answered with far less than reserved: room again, but the engine has stopped
    with pytest.raises(BudgetExceeded):
        m.reserve(1, 1, 1)
    held[1].release()
    assert m.spent().completion_tokens == 5 and m.spent().usd == pytest.approx((10 * 1 + 5 * 2) / 1e6)
    batch = SpendBook(None).meter("b", Price(input_per_mtok=1, output_per_mtok=2, batch_discount=0.5), batch=True)
    batch.charge(1, 1_000_000, 1_000_000)
    assert batch.spent().usd == pytest.approx(1.5)  # (1 + 2) * 0.5


def test_ledger_survives_a_kill_and_compacts_at_close(tmp_path: Path) -> None:
    book = SpendBook(tmp_path)
    m = book.meter("api", Price(input_per_mtok=1, output_per_mtok=1))
    for _ in range(5):
        m.charge(1, 100, 10)
    # as a kill -9 would leave it: one line a charge, flushed
    files = list((tmp_path / "spend").glob("*.jsonl"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) == 5
    assert read_ledger(tmp_path)["api"].requests == 5
    book.close()
    assert len(files[0].read_text().splitlines()) == 1
    again = SpendBook(tmp_path)  # a later run starts from the workdir's spend
    assert again.meter("api").spent().prompt_tokens == 500 and again.total().requests == 5


def test_plan_on_the_demo_recipe_with_a_priced_api_engine(tmp_path: Path, server: TokenizingServer, tiny_model_dir: Path) -> None:
    """recipes/demo.yaml with its replay teacher swapped for a priced API engine (and 60 problems)."""
    root = Path(__file__).resolve().parents[1]
    demo = yaml.safe_load((root / "recipes" / "demo.yaml").read_text())
    demo["workdir"] = str(tmp_path / "work")
    demo["source"][0]["path"] = str(root / "tracepipe" / "data" / "sources" / "gsm8k_train.jsonl")
    demo["source"][0]["limit"] = 60
    demo["outputs"][0]["path"] = str(tmp_path / "out")
    demo["engines"] = {"api": {
        "kind": "openai", "base_url": server.base_url, "model": "teacher", "api_key_env": KEY_ENV, "fingerprint": "teacher-v1",
        "tokenizer": str(tiny_model_dir), "concurrency": 4,
        "price": {"input_per_mtok": 0.55, "output_per_mtok": 2.19, "batch_discount": 0.5}, "budget": {"max_usd": 5},
    }}
    gen = next(i for i, s in enumerate(demo["stages"]) if "generate" in s)
    demo["stages"][gen] = {"generate": {"engine": "api", "n": 2, "max_tokens": 16}}
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(demo, sort_keys=False))

    res = cli("plan", str(path))
    assert res.exit_code == 0, res.output
    plan = plan_json(path)
    assert server.chat_requests() == []
    est = plan["stages"][gen]["estimate"]
    rows = plan["stages"][gen]["to_compute"]
    assert 0 < rows <= 60 and est["rows"] == rows and est["partial"]  # decontaminate has not run: an upper bound
    assert est["requests"] == 2 * rows and est["completion_tokens"]["max"] == 2 * rows * 16
    usd_max = (est["prompt_tokens"] * 0.55 + 2 * rows * 16 * 2.19) / 1e6
    assert est["usd"]["max"] == pytest.approx(usd_max, abs=1e-6)
    # the table prints these numbers
    line = next(ln for ln in res.stdout.splitlines() if "generate" in ln and "openai" in ln)
    for text in (f"{est['requests']:,}+", f"{est['prompt_tokens']:,}", f"{2 * rows * 16:,}", f"${est['usd']['max']:,.4f}"):
        assert text in line, (text, line)
    assert "budget of engine 'api': max_usd 5" in res.stdout and "fits" in res.stdout

    # the run sends at most what the plan counted (decontamination and the filter had not run)
    res = cli("run", str(path), "--no-progress")
    assert res.exit_code == 0, res.output
    seen = answered(server)
    assert 0 < len(seen) <= est["requests"]
    spend = json.loads((tmp_path / "work" / "stats.json").read_text())["spend"]["engines"]["api"]["run"]
    prompt, completion, _ = billed(seen)
    assert spend["prompt_tokens"] == prompt and spend["completion_tokens"] == completion <= est["completion_tokens"]["max"]
    assert prompt <= est["prompt_tokens"]
    assert spend["usd"] == pytest.approx((prompt * 0.55 + completion * 2.19) / 1e6, abs=1e-6)
    assert not plan_json(path)["stages"][gen].get("estimate")  # nothing left to send

    # the CPU stages have run, so a changed generate (another seed) is estimated over exactly the
    # rows the run sent: the same requests, prompt tokens within 1% of what the server counted,
    # completion tokens from what the first seed's rows wrote
    demo["stages"][gen]["generate"]["seed"] = 1
    path.write_text(yaml.safe_dump(demo, sort_keys=False))
    est2 = plan_json(path)["stages"][gen]["estimate"]
    assert not est2["partial"] and est2["requests"] == len(seen)
    assert abs(est2["prompt_tokens"] - prompt) <= 0.01 * prompt
    per = est2["completion_tokens"]["per_sample"]
    assert per["rows"] == len(seen) and per["from"].startswith("generate-")
    assert est2["completion_tokens"]["median"] == round(len(seen) * min(per["median"], 16))
