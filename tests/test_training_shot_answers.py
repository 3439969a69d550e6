"""The loss on XP's own answers (`shot_answers_weight`): the query loss with XP's first pairs (as many as the episode
has queries) as the queries, added with its weight, trains the PGM, and is logged as a term of its own."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import assert_lora_and_padding_have_gradients, build_tokenizer, make_pgm
from test_training_resume import make_trainer, tasks

from peft_metal.data import Episode
from peft_metal.training import EpisodeLoss, TrainingArguments


@pytest.mark.parametrize("scope", ["all", "padding"])
@pytest.mark.parametrize("answers_only", [False, True])
def test_the_term_is_the_query_loss_with_xp_as_the_queries(scope, answers_only):
    torch.manual_seed(0)
    pgm = make_pgm("llama", "prefix", padding_reparameterization="mlp", lora_scope=scope).eval()
    tok = build_tokenizer()
    upper = tasks()[0]
    episode = Episode("upper", xp=upper.examples[:3], xl=upper.examples[3:4], queries=upper.examples[4:6])
    loss = EpisodeLoss(pgm, tok, gradient_from_answers_only=answers_only, shot_answers_weight=0.5)
    with torch.no_grad():
        losses = loss(episode)
        xp_as_queries = EpisodeLoss(pgm, tok, gradient_from_answers_only=answers_only)(replace(episode, queries=episode.xp[:2]))
    assert losses["shot_answers"].item() == pytest.approx(xp_as_queries["lm_loss"].item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx(losses["lm_loss"].item() + 0.5 * losses["shot_answers"].item(), rel=1e-5)


def test_the_term_alone_trains_lora_and_padding():
    pgm = make_pgm("llama", "prefix", padding_reparameterization="mlp", lora_scope="padding").train()
    upper = tasks()[0]
    episode = Episode("upper", xp=upper.examples[:3], xl=[], queries=upper.examples[4:5])
    EpisodeLoss(pgm, build_tokenizer(), shot_answers_weight=1.0)(episode)["shot_answers"].backward()
    assert_lora_and_padding_have_gradients(pgm)


def test_a_run_logs_the_term_and_a_negative_weight_is_refused(tmp_path):
    with pytest.raises(ValueError, match="shot_answers_weight must be >= 0"):
        TrainingArguments(shot_answers_weight=-1.0)
    make_trainer(tmp_path, "prefix", scope="padding", shot_answers_weight=2.0).train()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    trained = [record for record in log if "loss" in record]
    assert trained and all({"lm_loss", "shot_answers"} <= set(record) for record in trained)
    for record in trained:
        assert record["loss"] == pytest.approx(record["lm_loss"] + 2.0 * record["shot_answers"], rel=1e-5)
