"""The attention of the passes that train: `graded_attention` while an episode's largest graded pass is short, the
reads' own (SDPA) when eager attention would keep too many scores for the backward."""

from __future__ import annotations

import pytest
import torch
from conftest import K, build_tokenizer, make_pgm
from test_training_resume import tasks

from peft_metal.compat import current_attention_implementation
from peft_metal.data import Episode
from peft_metal.metal_prompt.queries import encode_queries
from peft_metal.training import EpisodeLoss


def _episode() -> Episode:
    upper = tasks()[0]
    return Episode("upper", xp=upper.examples[:3], xl=upper.examples[3:4], queries=upper.examples[4:6])


def _graded_implementations(scope: str, eager_max_scores: float) -> set[str]:
    """The attention implementations the decoder ran with while a gradient was being recorded, over one episode."""
    pgm = make_pgm("llama", "prefix", padding_reparameterization="mlp", lora_scope=scope).train()
    lm = pgm.get_base_model()
    lm.set_attn_implementation("sdpa")
    seen = set()
    decoder = lm.base_model

    def record(module, args, kwargs):
        if torch.is_grad_enabled():
            seen.add(current_attention_implementation(lm))

    decoder.register_forward_pre_hook(record, with_kwargs=True)
    loss = EpisodeLoss(pgm, build_tokenizer(), graded_attention="eager")
    loss.eager_max_scores = eager_max_scores
    loss(_episode())["loss"].backward()
    return seen


@pytest.mark.parametrize("scope", ["all", "padding"])
def test_short_graded_passes_take_the_graded_attention_long_ones_the_reads(scope):
    assert _graded_implementations(scope, eager_max_scores=float("inf")) == {"eager"}
    assert _graded_implementations(scope, eager_max_scores=0) == {"sdpa"}


@pytest.mark.parametrize("scope", ["all", "padding"])
def test_graded_scores_count_the_largest_pass_of_either_scope(scope):
    pgm = make_pgm("llama", "prefix", padding_reparameterization="mlp", lora_scope=scope)
    tokenizer = build_tokenizer()
    loss = EpisodeLoss(pgm, tokenizer)
    queries = encode_queries([e.as_shot() for e in tasks()[0].examples[:3]], tokenizer, pgm.base_model.template, "cpu")
    rows, width = queries.input_ids.shape
    # 1,000 shot tokens: the PGM's pass is the largest, over every shot row in the paper's scope, the slots' only in
    # the compressed one.
    expected = (1000 + K) ** 2 if scope == "all" else K * (1000 + K)
    assert loss.graded_scores(1000, 5, queries) == expected
    # A long context before the queries: their pass is the largest.
    assert loss.graded_scores(1, 5000, queries) == rows * width * (K + 5000 + width)
