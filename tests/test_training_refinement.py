"""Training for refinement (`refinement_steps`): each episode's prompt is refined on XP as serving refines it, the
queries score the refined prompt, and the gradient reaches the PGM to first order (`refine.first_order`)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import assert_lora_and_padding_have_gradients, build_tokenizer, make_pgm
from test_training_resume import make_trainer, tasks

from peft_metal.compat import current_attention_implementation
from peft_metal.data import Episode
from peft_metal.metal_prompt.queries import encode_queries
from peft_metal.metal_prompt.refine import Refinement, first_order
from peft_metal.training import EpisodeLoss, TrainingArguments


def _query_loss(pgm, prompt, shots, tok):
    batch = encode_queries(shots, tok, pgm.base_model.template, torch.device("cpu"))
    return pgm(prompt=prompt, input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss


@pytest.mark.parametrize("design", ["prefix", "hidden_state", "discrete"])
def test_first_order_has_the_refined_value_and_passes_the_gradient_unchanged(design):
    pgm = make_pgm("llama", design, padding_reparameterization="mlp", lora_scope="padding").train()
    tok = build_tokenizer()
    upper = tasks()[0]
    xp = [e.as_shot() for e in upper.examples[:3]]
    queries = [e.as_shot() for e in upper.examples[4:6]]
    start = pgm.generate_prompt(xp, tokenizer=tok)
    refined = pgm.refine_prompt(start, xp, tok, steps=2)
    tensor_names = ["embeds"] if design == "discrete" else list(pgm.base_model._design.payload)
    shifted = first_order(start, refined, pgm.get_base_model())
    loss_after_shift = _query_loss(pgm, shifted, queries, tok)
    assert loss_after_shift.item() == pytest.approx(_query_loss(pgm, refined, queries, tok).item(), rel=1e-5)
    assert loss_after_shift.item() != pytest.approx(_query_loss(pgm, start, queries, tok).item(), rel=1e-3)

    # d loss / d start equals d loss / d refined, read at the refined prompt (the shift is a constant)
    leaves = {name: getattr(refined, name).detach().clone().requires_grad_() for name in tensor_names}
    at_refined = _query_loss(pgm, replace(refined, **leaves), queries, tok)
    at_refined.backward()
    start_leaves = {name: getattr(start, name).detach().clone().requires_grad_() for name in tensor_names}
    start_as_leaves = replace(start, **start_leaves)
    _query_loss(pgm, first_order(start_as_leaves, refined, pgm.get_base_model()), queries, tok).backward()
    for name in tensor_names:
        assert leaves[name].grad.abs().sum() > 0
        assert torch.allclose(start_leaves[name].grad, leaves[name].grad, atol=1e-6)


@pytest.mark.parametrize("scope", ["all", "padding"])
def test_the_queries_score_the_prompt_refined_on_xp(scope):
    torch.manual_seed(0)
    pgm = make_pgm("llama", "prefix", padding_reparameterization="mlp", lora_scope=scope).eval()
    tok = build_tokenizer()
    upper = tasks()[0]
    episode = Episode("upper", xp=upper.examples[:3], xl=[], queries=upper.examples[4:6])
    xp = [e.as_shot() for e in episode.xp]
    queries = [e.as_shot() for e in episode.queries]
    with torch.no_grad():
        refined_loss = EpisodeLoss(pgm, tok, refinement=Refinement(3, lr=1e-1))(episode)["lm_loss"]
        one_pass_loss = EpisodeLoss(pgm, tok)(episode)["lm_loss"]
        expected = _query_loss(pgm, pgm.refine_prompt(pgm.generate_prompt(xp, tokenizer=tok), xp, tok, steps=3, lr=1e-1), queries, tok)
    assert refined_loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert refined_loss.item() != pytest.approx(one_pass_loss.item(), rel=1e-3)


def test_the_refined_loss_trains_lora_and_padding():
    pgm = make_pgm("llama", "prefix", padding_reparameterization="mlp", lora_scope="padding").train()
    upper = tasks()[0]
    episode = Episode("upper", xp=upper.examples[:3], xl=upper.examples[3:4], queries=upper.examples[4:5])
    EpisodeLoss(pgm, build_tokenizer(), refinement=Refinement(1))(episode)["loss"].backward()
    assert_lora_and_padding_have_gradients(pgm)


def test_settings_are_checked_and_a_run_trains(tmp_path):
    with pytest.raises(ValueError, match="refinement_lr=0.1 is set but refinement_steps is 0"):
        TrainingArguments(refinement_lr=0.1)
    with pytest.raises(ValueError, match="steps >= 0"):
        TrainingArguments(refinement_steps=-1)
    with pytest.raises(ValueError, match="lr must be a number > 0"):
        TrainingArguments(refinement_steps=1, refinement_lr=0.0)
    assert TrainingArguments(refinement_steps=2).refinement == Refinement(2)
    assert TrainingArguments().refinement is None
    trainer = make_trainer(tmp_path, "prefix", scope="padding", refinement_steps=1)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [record for record in log if "loss" in record]
    assert any(not torch.equal(p, start[n]) for n, p in trainer.model.named_parameters() if p.requires_grad)
    saved = json.loads((tmp_path / "training_args.json").read_text())
    assert saved["refinement_steps"] == 1


def test_refinement_reads_with_the_models_own_attention_not_the_graded_passes(monkeypatch):
    pgm = make_pgm("llama", "prefix", padding_reparameterization="mlp", lora_scope="padding").train()
    lm = pgm.get_base_model()
    lm.set_attn_implementation("sdpa")
    seen = []
    tuner = pgm.base_model
    original = type(tuner).refine_prompt

    def recording(self, *args, **kwargs):
        seen.append(current_attention_implementation(lm))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tuner), "refine_prompt", recording)
    upper = tasks()[0]
    episode = Episode("upper", xp=upper.examples[:3], xl=[], queries=upper.examples[4:5])
    EpisodeLoss(pgm, build_tokenizer(), graded_attention="eager", refinement=Refinement(1))(episode)
    assert seen == ["sdpa"]
