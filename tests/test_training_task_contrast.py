"""The task-contrast term (`task_contrast_weight`): the queries' loss after a prompt made from another family's shots
is the query loss of the episode with those shots as XP; softplus(own - foreign) is added with its weight, trains the
PGM through both prompts, and is logged."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_lora_and_padding_have_gradients, build_tokenizer, make_pgm
from test_training_resume import make_trainer, tasks

from peft_metal.data import Episode
from peft_metal.training import EpisodeLoss, TrainingArguments


def episode_with_foreign_shots() -> Episode:
    upper, reverse = tasks()
    return Episode(
        "upper", xp=upper.examples[:3], xl=upper.examples[3:4], queries=upper.examples[4:6],
        foreign_task="reverse", foreign_xp=reverse.examples[6:9],
    )


@pytest.mark.parametrize("scope", ["all", "padding"])
@pytest.mark.parametrize("answers_only", [False, True])
def test_the_term_compares_the_query_loss_with_the_foreign_prompt(scope, answers_only):
    torch.manual_seed(0)
    pgm = make_pgm("llama", "prefix", padding_reparameterization="mlp", lora_scope=scope).eval()
    tok = build_tokenizer()
    episode = episode_with_foreign_shots()
    with torch.no_grad():
        losses = EpisodeLoss(pgm, tok, gradient_from_answers_only=answers_only, task_contrast_weight=0.5)(episode)
        plain = EpisodeLoss(pgm, tok, gradient_from_answers_only=answers_only)
        foreign = plain(replace(episode, xp=episode.foreign_xp))["lm_loss"]
        own = plain(episode)["lm_loss"]
    assert losses["lm_loss"].item() == pytest.approx(own.item(), rel=1e-5)
    assert losses["foreign_lm_loss"].item() == pytest.approx(foreign.item(), rel=1e-5)
    assert abs(foreign - own).item() > 1e-4  # the two prompts differ, so the comparison is not of equal numbers
    assert losses["task_contrast"].item() == pytest.approx(F.softplus(own - foreign).item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx(own.item() + 0.5 * losses["task_contrast"].item(), rel=1e-5)


def test_an_episode_without_foreign_shots_has_no_term():
    pgm = make_pgm("llama", "prefix", padding_reparameterization="mlp", lora_scope="padding").eval()
    episode = replace(episode_with_foreign_shots(), foreign_task=None, foreign_xp=[])
    with torch.no_grad():
        losses = EpisodeLoss(pgm, build_tokenizer(), task_contrast_weight=1.0)(episode)
    assert "task_contrast" not in losses and losses["loss"].item() == losses["lm_loss"].item()


def test_the_term_trains_lora_and_padding_through_the_foreign_prompt_too():
    pgm = make_pgm("llama", "prefix", padding_reparameterization="mlp", lora_scope="padding").train()
    losses = EpisodeLoss(pgm, build_tokenizer(), task_contrast_weight=1.0)(episode_with_foreign_shots())
    # -foreign_lm_loss alone: a gradient only the foreign prompt can carry
    (-losses["foreign_lm_loss"]).backward()
    assert_lora_and_padding_have_gradients(pgm)


def test_a_run_logs_the_term_and_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="task_contrast_weight must be >= 0"):
        TrainingArguments(task_contrast_weight=-1.0)
    with pytest.raises(ValueError, match="task_contrast_weight=1.0.*refinement_steps=1.*set one of them to 0"):
        TrainingArguments(task_contrast_weight=1.0, refinement_steps=1)
    trainer = make_trainer(tmp_path, "prefix", scope="padding", task_contrast_weight=2.0)
    assert trainer.sampler.foreign_shots and not make_trainer(tmp_path / "off", "prefix").sampler.foreign_shots
    trainer.train()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    trained = [record for record in log if "loss" in record]
    assert trained and all({"lm_loss", "foreign_lm_loss", "task_contrast"} <= set(record) for record in trained)
    for record in trained:
        assert record["loss"] == pytest.approx(record["lm_loss"] + 2.0 * record["task_contrast"], rel=1e-5)
