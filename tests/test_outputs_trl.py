"""The shards feed TRL as they are: real SFTTrainer / DPOTrainer steps with the tiny offline model (CPU)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest


def _train_files(out: Path) -> list[str]:
    return [str(p) for p in sorted((out / "data").glob("train-*.parquet"))]


def _small_config(cls: Any, out: Path, **kw: Any) -> Any:
    return cls(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, seed=0, **kw,
    )


def _params_changed(before: dict[str, Any], model: Any) -> bool:
    return any(not before[n].equal(p.detach().cpu()) for n, p in model.named_parameters() if n in before)


@pytest.mark.slow
def test_sft_trainer_trains_on_sft_messages(traces_outputs: dict[str, Any], tiny_model_dir: Path, tmp_path: Path) -> None:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    ds = load_dataset("parquet", data_files={"train": _train_files(traces_outputs["sft-messages"])})["train"]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = SFTTrainer(
        model=model, processing_class=tok, train_dataset=ds,
        args=_small_config(SFTConfig, tmp_path / "sft", max_length=256),
    )
    # TRL recognised the conversational format: it applied the chat template (with the think block)
    first = trainer.train_dataset[0]
    text = tok.decode(first["input_ids"])
    assert "<|im_start|>assistant" in text and "<think>" in text
    result = trainer.train()
    assert result.global_step == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    assert _params_changed(before, trainer.model)


@pytest.mark.slow
def test_sft_trainer_trains_on_prompt_completion(traces_outputs: dict[str, Any], tiny_model_dir: Path, tmp_path: Path) -> None:
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    ds = load_dataset("parquet", data_files={"train": _train_files(traces_outputs["prompt-completion"])})["train"]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = SFTTrainer(model=str(tiny_model_dir), processing_class=tok, train_dataset=ds,
                         args=_small_config(SFTConfig, tmp_path / "pc", max_length=256))
    row = trainer.train_dataset[0]
    # completion-only loss: the prompt tokens are masked out, the completion is trained on
    if "completion_mask" in row:
        assert 0 < sum(row["completion_mask"]) < len(row["input_ids"])
    else:  # TRL >= 1.x builds labels with -100 on the prompt
        masked = sum(1 for v in row["labels"] if v == -100)
        assert 0 < masked < len(row["labels"])
    assert trainer.train().global_step == 2


@pytest.mark.slow
def test_dpo_pairs_feed_dpo_trainer(traces_outputs: dict[str, Any], tiny_model_dir: Path, tmp_path: Path) -> None:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    ds = load_dataset("parquet", data_files={"train": _train_files(traces_outputs["dpo-pairs"])})["train"]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    example = ds[0]
    assert is_conversational(example)
    applied = maybe_apply_chat_template(example, tok)
    assert applied["prompt"].endswith("<|im_start|>assistant\n")
    assert applied["chosen"] != applied["rejected"] and "<think>" in applied["chosen"]

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = DPOTrainer(model=model, processing_class=tok, train_dataset=ds,
                         args=_small_config(DPOConfig, tmp_path / "dpo", max_length=256))
    row = trainer.train_dataset[0]
    ids = {k.removesuffix("_input_ids").removesuffix("_ids"): v for k, v in row.items() if k.endswith("_ids")}
    assert {"prompt", "chosen", "rejected"} <= set(ids), f"DPOTrainer did not tokenize the pairs: {list(row)}"
    assert ids["chosen"] != ids["rejected"] and len(ids["prompt"]) > 0
    result = trainer.train()
    assert result.global_step == 2
    assert _params_changed(before, trainer.model)


def test_sharegpt_reads_as_llamafactory_and_trl_chatml(traces_outputs: dict[str, Any]) -> None:
    import json

    from datasets import load_dataset
    from trl.data_utils import is_conversational_from_value, maybe_convert_to_chatml

    out = traces_outputs["sharegpt"]
    ds = load_dataset("parquet", data_files={"train": _train_files(out)})["train"]
    info = next(iter(json.loads((out / "dataset_info.json").read_text()).values()))
    tags = info["tags"]
    assert info["formatting"] == "sharegpt" and info["columns"]["messages"] == "conversations"
    row = ds[0]
    assert is_conversational_from_value(row)
    # LLaMA-Factory's reading: role_tag / content_tag keys, user turn first, assistant last
    turns = row["conversations"]
    assert turns[0][tags["role_tag"]] == tags["user_tag"] and turns[-1][tags["role_tag"]] == tags["assistant_tag"]
    conv = maybe_convert_to_chatml(dict(row))
    assert [t["role"] for t in conv["messages"]] == [tags["user_tag"], tags["assistant_tag"]]
    assert conv["messages"][1]["content"].startswith("<think>")
