"""Refined prompts as meta-training targets: made once per task (resumable, one recipe per folder), checked against
the PGM they train, and a loss that is 0 at the target and pulls the PGM's one-pass prompt towards it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_lora_and_padding_have_gradients, build_tokenizer, make_pgm
from test_training_resume import make_trainer, tasks

from peft_metal.cli import main
from peft_metal.training import TrainingArguments
from peft_metal.training.prompt_targets import (
    TargetSettings,
    load_prompt_targets,
    make_prompt_targets,
    prompt_target_loss,
    target_path,
)

SETTINGS = TargetSettings(pgm="tiny", shots=3, steps=2, lr=1e-1, batch_size=2, seed=0)


@pytest.fixture
def pgm():
    return make_pgm("llama", "prefix", padding_reparameterization="mlp", lora_scope="padding")


def test_targets_are_refined_prompts_one_per_task_and_a_killed_run_continues(tmp_path, pgm):
    tok = build_tokenizer()
    assert make_prompt_targets(pgm.base_model, tok, tasks(), tmp_path, SETTINGS, progress=False) == ["upper", "reverse"]
    targets = load_prompt_targets(tmp_path, ["upper", "reverse"], pgm.base_model)
    shots, _ = tasks()[0].split(3, 0, 0)
    with torch.no_grad():
        start = pgm.base_model.generate_prompt([e.as_shot() for e in shots], tokenizer=tok)
    assert set(targets["upper"]) == {"keys", "values"} and targets["upper"]["keys"].shape == start.keys.shape
    assert not torch.allclose(targets["upper"]["keys"], start.keys.float())  # refined: moved from the PGM's prompt
    assert not torch.allclose(targets["upper"]["keys"], targets["reverse"]["keys"])

    target_path(tmp_path, "reverse").unlink()  # as if killed before the last task
    before = target_path(tmp_path, "upper").read_bytes()
    assert make_prompt_targets(pgm.base_model, tok, tasks(), tmp_path, SETTINGS, progress=False) == ["reverse"]
    assert target_path(tmp_path, "upper").read_bytes() == before
    with pytest.raises(ValueError, match="made with .*'steps': 2.*not .*'steps': 3"):
        make_prompt_targets(pgm.base_model, tok, tasks(), tmp_path, TargetSettings("tiny", 3, 3, 1e-1, 2, 0), progress=False)


def test_loading_refuses_missing_tasks_and_another_pgms_targets(tmp_path, pgm):
    tok = build_tokenizer()
    make_prompt_targets(pgm.base_model, tok, tasks()[:1], tmp_path, SETTINGS, progress=False)
    assert target_path(tmp_path, "family/sub").name == "family__sub.safetensors"
    with pytest.raises(ValueError, match=r"no prompt target for 1 train task\(s\), e.g. \['reverse'\]"):
        load_prompt_targets(tmp_path, ["upper", "reverse"], pgm.base_model)
    other = make_pgm("llama", "prefix", padding_reparameterization="mlp", lora_scope="padding", num_prompt_tokens=6)
    with pytest.raises(ValueError, match="prefix prompt of 4 positions; the PGM makes prefix prompts of 6"):
        load_prompt_targets(tmp_path, ["upper"], other.base_model)


def test_the_loss_is_zero_at_the_target_and_trains_the_pgm(pgm):
    tok = build_tokenizer()
    prompt = pgm.train().generate_prompt([("ab", "AB"), ("cd", "CD")], tokenizer=tok)
    lm = pgm.get_base_model()
    same = {"keys": prompt.keys.detach().float(), "values": prompt.values.detach().float()}
    assert prompt_target_loss(prompt, same, lm).item() == pytest.approx(0.0, abs=1e-6)
    doubled = {name: 2 * t for name, t in same.items()}
    assert prompt_target_loss(prompt.detach().to(dtype=torch.float32), doubled, lm).item() == pytest.approx(0.25, rel=1e-4)
    prompt_target_loss(prompt, doubled, lm).backward()
    assert_lora_and_padding_have_gradients(pgm)


def test_a_run_with_targets_logs_the_term_and_ends_closer_to_them(tmp_path):
    targets = tmp_path / "targets"
    pgm = make_pgm("llama", "prefix", padding_reparameterization="mlp", lora_scope="padding")
    make_prompt_targets(pgm.base_model, build_tokenizer(), tasks(), targets, SETTINGS, progress=False)
    loaded = load_prompt_targets(targets, ["upper", "reverse"], pgm.base_model)

    def distance_after_training(name: str, **settings) -> float:
        trainer = make_trainer(tmp_path / name, "prefix", max_steps=6, scope="padding", **settings)
        trainer.train()
        trainer.model.eval()
        episodes = [trainer.sampler.episode(i) for i in range(4)]
        with torch.no_grad():
            prompts = [trainer.model.generate_prompt([e.as_shot() for e in ep.xp], tokenizer=trainer.tokenizer) for ep in episodes]
        lm = trainer.model.get_base_model()
        return sum(prompt_target_loss(p, loaded[ep.task_name], lm).item() for p, ep in zip(prompts, episodes))

    pulled = distance_after_training("pulled", prompt_targets=str(targets), prompt_target_weight=10.0)
    assert pulled < distance_after_training("free")
    log = [json.loads(line) for line in (tmp_path / "pulled" / "log.jsonl").read_text().splitlines()]
    trained = [record for record in log if "loss" in record]
    assert trained and all({"lm_loss", "prompt_target"} <= set(record) for record in trained)
    for record in trained:
        assert record["loss"] == pytest.approx(record["lm_loss"] + 10.0 * record["prompt_target"], rel=1e-5)


def test_settings_that_cannot_go_together_are_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="go together: give both"):
        TrainingArguments(prompt_targets=str(tmp_path))
    with pytest.raises(ValueError, match="go together: give both"):
        TrainingArguments(prompt_target_weight=1.0)
    with pytest.raises(ValueError, match="symbol_label_rate=0.5 renames"):
        TrainingArguments(prompt_targets=str(tmp_path), prompt_target_weight=1.0, symbol_label_rate=0.5)
    with pytest.raises(ValueError, match="no prompt target for 2 train task"):
        make_trainer(tmp_path, "prefix", scope="padding", prompt_targets=str(tmp_path), prompt_target_weight=1.0)


def test_cli_refuses_tasks_outside_the_train_split(capsys):
    assert main(["prompt-targets", "--pgm", "x", "--output", "y", "--tasks", "snarks"]) == 2
    assert "snarks" in capsys.readouterr().err


def test_bad_target_settings_are_refused_before_a_folder_records_them(tmp_path, capsys):
    with pytest.raises(ValueError, match="lr must be a number > 0"):
        TargetSettings(pgm="tiny", lr=0.0)
    with pytest.raises(ValueError, match="shots >= 1"):
        TargetSettings(pgm="tiny", shots=0)
    arguments = ["prompt-targets", "--pgm", "x", "--output", str(tmp_path / "t"), "--tasks", "anachronisms", "--steps", "-1"]
    assert main(arguments) == 2
    assert "steps >= 0" in capsys.readouterr().err and not (tmp_path / "t").exists()
