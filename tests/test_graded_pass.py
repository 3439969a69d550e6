"""The answers' graded pass as bucketed tensor code (`compile_graded_pass`): uncompiled it is the LM's own forward,
compiled the same within bf16's tolerance, and a run says why when it cannot compile and refuses buckets too small
for its episodes before it starts."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import build_tokenizer, make_lm, make_pgm
from test_training_packing import EXAMPLES
from test_training_resume import tasks

from peft_metal.compat import inductor_missing
from peft_metal.data import Episode, Example, Task
from peft_metal.metal_prompt.graded_pass import (
    BucketTooSmallError,
    GradedPass,
    bucket_for,
    graded_bucket_for,
    why_not_compiled,
)
from peft_metal.metal_prompt.queries import encode_queries
from peft_metal.metal_prompt.reading import forward_with_prompt
from peft_metal.precision import cast_frozen_weights
from peft_metal.training import EpisodeLoss, MetaTrainer, TrainingArguments

pytestmark = pytest.mark.one_thread

EPISODE = Episode("mixed", xp=EXAMPLES[:3], xl=EXAMPLES[3:5], queries=EXAMPLES[3:7])


def test_buckets_hold_the_length_or_name_both_numbers():
    assert bucket_for(1, (8, 16)) == 8
    assert bucket_for(16, (8, 16)) == 16
    with pytest.raises(BucketTooSmallError, match="reads 17 keys, more than the largest bucket, 16"):
        bucket_for(17, (8, 16))
    assert [graded_bucket_for(n) for n in (1, 8, 9, 33)] == [8, 8, 16, 64]


def _loss_and_gradients(pgm, graded_pass=None, pack_queries: bool = False) -> tuple[float, list[torch.Tensor]]:
    """One episode's query loss through `EpisodeLoss` (answers-only gradient) and the PGM's gradients."""
    loss_module = EpisodeLoss(
        pgm, build_tokenizer(), gradient_from_answers_only=True, pack_queries=pack_queries, graded_pass=graded_pass
    )
    torch.manual_seed(0)
    loss = loss_module(EPISODE)["loss"]
    parameters = [p for p in pgm.parameters() if p.requires_grad]
    gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
    return loss.item(), [g if g is not None else torch.zeros_like(p) for g, p in zip(gradients, parameters)]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("design", ["prefix", "hidden_state"])
@pytest.mark.parametrize("scope", ["padding", "all"])
@pytest.mark.parametrize("packed", [False, True])
def test_the_uncompiled_pass_is_the_lms_forward(family, design, scope, packed):
    """Padded keys, padded graded positions and left-padded (or packed) queries change nothing: the same loss and
    gradients as transformers' forward over the cache, in fp32. This also breaks if transformers renames a Llama
    layer's parts."""
    pgm = make_pgm(family, design, lora_scope=scope, padding_reparameterization="mlp").train()
    expected_loss, expected = _loss_and_gradients(pgm, pack_queries=packed)
    graded_pass = GradedPass(pgm.get_base_model(), buckets=(48, 96, 192), compiled=False)
    loss, gradients = _loss_and_gradients(pgm, graded_pass, pack_queries=packed)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert any(g.abs().sum() > 0 for g in expected)
    for got, want in zip(gradients, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_the_pass_gives_the_logits_of_each_graded_position():
    pgm = make_pgm("llama", "prefix", lora_scope="padding")
    tokenizer = build_tokenizer()
    lm = pgm.get_base_model()
    prompt = pgm.generate_prompt([e.as_shot() for e in EXAMPLES[:3]], tokenizer=tokenizer)
    batch = encode_queries([e.as_shot() for e in EXAMPLES[3:7]], tokenizer, pgm.base_model.template, "cpu")
    with torch.no_grad(), pgm.base_model.lm_only():
        want = forward_with_prompt(lm, prompt, batch.input_ids, batch.attention_mask, batch.labels, gradient_from_answers_only=True)
        got = forward_with_prompt(
            lm, prompt, batch.input_ids, batch.attention_mask, batch.labels, gradient_from_answers_only=True,
            graded_pass=GradedPass(lm, buckets=(64,), compiled=False),
        )
    assert got.logits.shape == want.logits.shape
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(inductor_missing() is not None, reason=f"no inductor here: {inductor_missing()}")
@pytest.mark.parametrize("packed", [False, True])
def test_the_compiled_pass_gives_the_eager_loss_and_gradients_within_bf16_tolerance(packed):
    """bf16 frozen weights, as meta-training runs on a CPU with bf16 hardware; inductor compiles one graph per bucket."""
    pgm = make_pgm("llama", "prefix", lora_scope="padding", padding_reparameterization="mlp").train()
    cast_frozen_weights(pgm, "bf16")
    expected_loss, expected = _loss_and_gradients(pgm, pack_queries=packed)
    compiled = GradedPass(pgm.get_base_model(), buckets=(128, 256), compiled=True)
    loss, gradients = _loss_and_gradients(pgm, compiled, pack_queries=packed)
    assert compiled.compiled, "inductor fell back to eager on this tiny graph"
    assert loss == pytest.approx(expected_loss, rel=2e-2)
    for got, want in zip(gradients, expected):
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 0.05 * scale + 1e-6


def test_only_llama_style_decoders_and_bf16_machines_compile():
    gpt2 = make_lm("gpt2")
    assert "not Llama-style" in why_not_compiled(gpt2, "bf16")
    assert "no bf16 hardware" in why_not_compiled(make_lm("llama"), "fp32")
    with pytest.raises(ValueError, match="'gemma' decoder is not Llama-style"):
        GradedPass(make_lm("gemma"))


def _args(tmp_path, **settings) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path), prompt_design="prefix", lora_scope="padding", max_steps=1, learning_rate=1e-2,
        warmup_steps=0, gradient_accumulation_steps=1, xp_range=(1, 3), xl_range=(0, 1), num_queries=2, eval_episodes=0,
        gradient_from_answers_only=True, compile_graded_pass=True, **settings,
    )


def _trainer(args: TrainingArguments, lm_family: str = "llama", train_tasks=None) -> MetaTrainer:
    model = make_pgm(lm_family, "prefix", lora_scope="padding", padding_reparameterization="mlp")
    return MetaTrainer(args, model=model, tokenizer=build_tokenizer(), train_tasks=train_tasks or tasks(), dev_tasks=[])


def test_a_run_that_cannot_compile_runs_eager_and_says_why_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        trainer = _trainer(_args(tmp_path, mixed_precision="fp32"))
    lines = [r.getMessage() for r in caplog.records if "compile_graded_pass" in r.getMessage()]
    assert lines == ["compile_graded_pass: the graded pass runs eager: this CPU has no bf16 hardware (AMX or "
                     "AVX512-BF16), so the frozen LM runs in fp32."]
    assert trainer.loss_module.graded_pass is None
    trainer.train()  # and it trains


def test_buckets_smaller_than_the_runs_longest_episode_are_refused_before_training(tmp_path):
    long_task = Task("long", [Example("word " * 30, "yes")] + [Example(w, "no") for w in ("ab", "cd", "ef", "gh", "ij")])
    with pytest.raises(BucketTooSmallError, match=r"largest bucket, 32 keys, is smaller than this run's longest "
                                                  r"episode, which can read up to \d+ keys .* add a bucket of at least"):
        _trainer(_args(tmp_path, graded_pass_buckets=[16, 32]), train_tasks=[long_task])


def test_settings_that_cannot_use_the_compiled_pass_are_refused():
    with pytest.raises(ValueError, match="needs gradient_from_answers_only true"):
        TrainingArguments(compile_graded_pass=True)
    with pytest.raises(ValueError, match=r"graded_pass_buckets must be positive lengths in increasing order, got \[64, 32\]"):
        TrainingArguments(graded_pass_buckets=[64, 32])
