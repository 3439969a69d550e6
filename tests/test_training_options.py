"""Option distillation: options scored from the cached queries (gold answer masked) as evaluation scores them, and a
KL between teacher and student distributions over them that trains the PGM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import SHOTS, build_tokenizer, encode, make_lm, make_pgm

from peft_metal.compat import returned_cache
from peft_metal.data import Example
from peft_metal.metal_prompt import ShotTemplate
from peft_metal.metal_prompt.queries import encode_queries
from peft_metal.training import EpisodeLoss
from peft_metal.training.options import encode_options, option_scores

QUERIES = [
    Example("good", "yes", options=("no", "yes", "maybe")),
    Example("a rather bad film", "no", options=("no", "yes")),
    Example("free text", "whatever"),  # generative: no option rows
]


def mean_logprob(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Mean log-probability of `tokens` given logits whose positions each predict the next token."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    return logprobs[torch.arange(len(tokens)), tokens].mean().item()


@pytest.mark.parametrize("scope", ["all", "padding"])
def test_student_option_scores_equal_scoring_each_option_after_its_query(scope):
    tok, template = build_tokenizer(), ShotTemplate()
    model = make_pgm("llama", "prefix", lora_scope=scope)
    prompt = model.generate_prompt(SHOTS, tokenizer=tok, num_demonstrations=1)
    batch = encode_queries([q.as_shot() for q in QUERIES], tok, template, torch.device("cpu"))
    options = encode_options(QUERIES, tok, template, torch.device("cpu"))
    assert options.groups == [[0, 1, 2], [3, 4]] and options.query_index.tolist() == [0, 0, 0, 1, 1]
    with torch.no_grad():
        out = model(prompt=prompt, input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=True)
        layers = [(layer.keys, layer.values) for layer in returned_cache(out).layers]
        scores = option_scores(model.get_base_model(), layers, batch, out.logits, options)
        row = 0
        for example in QUERIES[:2]:
            query = encode(tok, template.format_query(example.input))
            for option in example.options:
                option_ids = encode(tok, template.format_answer(option))
                ids = torch.cat([query, option_ids]).unsqueeze(0)
                logits = model(prompt=prompt, input_ids=ids).logits[0, len(query) - 1 : -1]
                assert scores[row].item() == pytest.approx(mean_logprob(logits, option_ids), abs=1e-4)
                row += 1


def test_option_distillation_is_a_kl_that_trains_the_pgm():
    from peft_metal.data import Episode

    tok = build_tokenizer()
    model = make_pgm("llama", "prefix", lora_scope="padding").train()
    shots = [Example(x, y) for x, y in SHOTS]
    episode = Episode("t", xp=shots[:2], xl=shots[2:], queries=QUERIES)
    module = EpisodeLoss(model, tok, option_distillation_weight=0.5)
    losses = module(episode)
    assert losses["option_distillation"] >= 0 and "distillation" not in losses
    torch.testing.assert_close(losses["loss"], losses["lm_loss"] + 0.5 * losses["option_distillation"])
    losses["option_distillation"].backward()
    padding = model.base_model.metal_padding["default"]
    assert padding.embedding.grad is not None and padding.embedding.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n and "metal_padding" not in n)


def test_teacher_option_scores_equal_the_lm_reading_every_shot():
    tok, template = build_tokenizer(), ShotTemplate()
    model = make_pgm("llama", "prefix", lora_scope="padding")
    module = EpisodeLoss(model, tok, option_distillation_weight=1.0)
    shots = [Example(x, y) for x, y in SHOTS]
    xp, xl = module._encode(shots[:2]), module._encode(shots[2:])
    batch = encode_queries([q.as_shot() for q in QUERIES], tok, template, torch.device("cpu"))
    options = encode_options(QUERIES, tok, template, torch.device("cpu"))
    read = model.base_model.read_shots(xp)
    logits, layers = module._teacher(read, xl, batch)
    with torch.no_grad():
        scores = option_scores(model.get_base_model(), layers, batch, logits, options, read.first_position)
    reference = make_lm("llama")
    query = encode(tok, template.format_query(QUERIES[1].input))
    for row, option in zip((3, 4), QUERIES[1].options):
        option_ids = encode(tok, template.format_answer(option))
        with torch.no_grad():
            full = reference(input_ids=torch.cat([xp, xl, query, option_ids]).unsqueeze(0)).logits[0]
        expected = mean_logprob(full[-len(option_ids) - 1 : -1], option_ids)
        assert scores[row].item() == pytest.approx(expected, abs=1e-4)


def test_option_rows_stay_within_their_memory_budget():
    """Each option row copies its query's keys/values: queries whose rows would exceed the budget are left out."""
    tok, template = build_tokenizer(), ShotTemplate()
    everything = encode_options(QUERIES, tok, template, torch.device("cpu"), row_bytes=100, budget_bytes=10_000)
    assert everything.groups == [[0, 1, 2], [3, 4]]
    only_second = encode_options(QUERIES, tok, template, torch.device("cpu"), row_bytes=100, budget_bytes=250)
    assert only_second.groups == [[0, 1]] and only_second.query_index.tolist() == [1, 1]
    assert encode_options(QUERIES, tok, template, torch.device("cpu"), row_bytes=100, budget_bytes=150) is None
