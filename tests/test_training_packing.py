"""Packed queries (`pack_queries`): an episode's queries read as one row each for their unlabelled and their graded
tokens, instead of a batch left-padded to the longest, with the same loss and the same gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tokenizer, make_pgm

from peft_metal import MetaLPromptConfig
from peft_metal.base_models import load_base_model
from peft_metal.data import Episode, Example
from peft_metal.metal_prompt.packing import pack_queries
from peft_metal.metal_prompt.queries import QueryBatch, encode_queries
from peft_metal.metal_prompt.reading import forward_with_prompt
from peft_metal.precision import cast_frozen_weights
from peft_metal.training import EpisodeLoss, TrainingArguments

pytestmark = pytest.mark.one_thread

# Inputs and answers of different lengths, so the padded batch pads and the packed rows do not.
EXAMPLES = [
    Example("ab", "AB"),
    Example("a much longer input", "LONG ANSWER"),
    Example("cd", "x"),
    Example("efgh ij", "EFGH"),
    Example("klm", "KL"),
    Example("no", "NOPE"),
    Example("qrstuv wx", "Q"),
]


def _episode(demonstrations: int) -> Episode:
    return Episode("mixed", xp=EXAMPLES[:3], xl=EXAMPLES[3 : 3 + demonstrations], queries=EXAMPLES[3:7])


def test_pack_queries_cuts_each_query_where_its_answer_is_first_predicted():
    # Row 0: 2 pads, query [5, 6], answer [7]; row 1: query [8, 9, 10], answer [11, 12].
    batch = QueryBatch(
        input_ids=torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]]),
        attention_mask=torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),
        labels=torch.tensor([[-100, -100, -100, -100, 7], [-100, -100, -100, 11, 12]]),
    )
    packed = pack_queries(batch)
    assert packed.prefix_ids.tolist() == [[5, 8, 9]]
    assert packed.prefix_positions.tolist() == [[0, 0, 1]]
    assert packed.prefix_segments.tolist() == [0, 1, 1]
    assert packed.graded_ids.tolist() == [[6, 7, 10, 11, 12]]
    assert packed.graded_positions.tolist() == [[1, 2, 2, 3, 4]]
    assert packed.graded_segments.tolist() == [0, 0, 1, 1, 1]
    assert packed.targets.tolist() == [[7, -100, 11, 12, -100]]


def test_a_query_without_an_answer_cannot_be_packed():
    batch = QueryBatch(torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long), torch.full((1, 2), -100))
    with pytest.raises(ValueError, match="Query 0 has no labelled answer token"):
        pack_queries(batch)


def test_packing_needs_the_gradient_cut_to_the_answers():
    pgm = make_pgm("llama", "prefix", lora_scope="padding")
    tokenizer = build_tokenizer()
    prompt = pgm.generate_prompt([e.as_shot() for e in EXAMPLES[:3]], tokenizer=tokenizer)
    batch = encode_queries([e.as_shot() for e in EXAMPLES[3:5]], tokenizer, pgm.base_model.template, "cpu")
    with pytest.raises(ValueError, match="needs gradient_from_answers_only"):
        forward_with_prompt(pgm.get_base_model(), prompt, batch.input_ids, batch.attention_mask, batch.labels, pack_queries=True)


def _unpadded_rows(batch: QueryBatch) -> list[QueryBatch]:
    return [
        QueryBatch(*(t[row][batch.attention_mask[row].bool()].unsqueeze(0) for t in (batch.input_ids, batch.attention_mask, batch.labels)))
        for row in range(batch.input_ids.shape[0])
    ]


def _losses(pgm, tokenizer, episode: Episode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One prompt made in train mode from XP (XL its demonstrations), and its loss on the queries: packed, over the
    padded batch, and query by query without padding (each weighted by its answer tokens)."""
    lm = pgm.get_base_model()
    prompt = pgm.generate_prompt(
        [e.as_shot() for e in episode.xp + episode.xl], tokenizer=tokenizer, num_demonstrations=len(episode.xl)
    )
    batch = encode_queries([q.as_shot() for q in episode.queries], tokenizer, pgm.base_model.template, "cpu")
    assert not batch.attention_mask.all(), "the queries must differ in length for the test to mean anything"

    def loss(rows: QueryBatch, **kwargs) -> torch.Tensor:
        with pgm.base_model.lm_only():
            return forward_with_prompt(
                lm, prompt, rows.input_ids, rows.attention_mask, rows.labels, gradient_from_answers_only=True, **kwargs
            ).loss

    answers = [int((row.labels[0, 1:] != -100).sum()) for row in _unpadded_rows(batch)]
    by_query = sum(n * loss(row) for n, row in zip(answers, _unpadded_rows(batch))) / sum(answers)
    return loss(batch, pack_queries=True), loss(batch), by_query


def _gradients(pgm, loss: torch.Tensor) -> list[torch.Tensor]:
    parameters = [p for p in pgm.parameters() if p.requires_grad]
    return [g if g is not None else torch.zeros_like(p) for g, p in
            zip(torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True), parameters)]


@pytest.mark.parametrize("design", ["prefix", "hidden_state", "weighted_sum", "discrete"])
@pytest.mark.parametrize("scope", ["padding", "all"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("demonstrations", [0, 2])
def test_packed_queries_give_each_querys_own_loss_and_gradients(design, scope, attention, demonstrations):
    """The same loss as the padded batch, and the gradient of each query read alone: cut exactly where its own answer
    starts (a padded batch cuts every row where the longest answer starts, so shorter answers' rows grade some query
    tokens too)."""
    pgm = make_pgm("llama", design, lora_scope=scope, padding_reparameterization="mlp").train()
    pgm.get_base_model().set_attn_implementation(attention)
    torch.manual_seed(0)
    packed, padded, by_query = _losses(pgm, build_tokenizer(), _episode(demonstrations))
    assert packed.item() == pytest.approx(padded.item(), rel=1e-5)
    assert packed.item() == pytest.approx(by_query.item(), rel=1e-5)
    expected = _gradients(pgm, by_query)
    assert any(g.abs().sum() > 0 for g in expected)
    for got, want in zip(_gradients(pgm, packed), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_episode_loss_packs_the_queries_only_with_the_gradient_cut():
    pgm = make_pgm("llama", "prefix", lora_scope="padding")
    assert EpisodeLoss(pgm, build_tokenizer(), gradient_from_answers_only=True, pack_queries=True).pack_queries
    assert not EpisodeLoss(pgm, build_tokenizer(), gradient_from_answers_only=False, pack_queries=True).pack_queries
    assert not TrainingArguments().pack_queries  # opt-in: it costs more than it saves on long queries


def test_packed_queries_on_smollm2_in_bf16_match_each_query_read_alone():
    """The real model in the precision it trains in: loss and gradients agree within bf16's tolerance."""
    from peft import get_peft_model

    lm, tokenizer = load_base_model("smollm2-135m")
    config = MetaLPromptConfig(
        task_type="CAUSAL_LM", prompt_design="prefix", num_prompt_tokens=4, lora_scope="padding", r=4,
        padding_reparameterization="none", init_lora_weights=False,
    )
    torch.manual_seed(0)
    pgm = get_peft_model(lm, config).train()
    cast_frozen_weights(pgm, "bf16")
    episode = Episode(
        "sentiment",
        xp=[Example("A gripping film.", "positive"), Example("Dull.", "negative")],
        xl=[Example("I laughed all the way through it.", "positive")],
        queries=[Example("A waste of two whole hours of my life.", "negative"), Example("Lovely.", "positive")],
    )
    packed, _, by_query = _losses(pgm, tokenizer, episode)
    assert packed.item() == pytest.approx(by_query.item(), rel=2e-2)
    for got, want in zip(_gradients(pgm, packed), _gradients(pgm, by_query)):
        if want.abs().sum() > 0:
            assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.98
