"""The option-ranking term (`option_ranking_weight`): each multiple-choice query's options scored as evaluation ranks
them (mean log-probability per answer token after the query), a cross-entropy towards the correct ones that trains
the PGM, its accuracy logged beside it, in training and on dev."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    SHOTS,
    assert_lora_and_padding_have_gradients,
    build_tokenizer,
    encode,
    make_pgm,
    train_on_a_labelled_task,
)

from peft_metal.data import Episode, Example
from peft_metal.metal_prompt import ShotTemplate
from peft_metal.training import EpisodeLoss, TrainingArguments
from peft_metal.training.options import encode_option_queries, ranked_options

QUERIES = [
    Example("good", "yes", options=("no", "yes", "maybe")),
    Example("free text", "whatever"),  # generative: no option rows
    Example("a rather bad film", "no", alternatives=("nope",), options=("no", "yes", "nope")),  # two correct
]


def episode(queries=QUERIES) -> Episode:
    shots = [Example(x, y) for x, y in SHOTS]
    return Episode("t", xp=shots[:2], xl=shots[2:], queries=list(queries))


def test_option_rows_group_every_option_and_mark_the_correct_ones():
    options = encode_option_queries(QUERIES, build_tokenizer(), ShotTemplate(), torch.device("cpu"))
    assert options.groups == [[0, 1, 2], [3, 4, 5]] and options.correct == [[1], [0, 2]]
    assert options.batch.input_ids.shape[0] == 6
    assert encode_option_queries(QUERIES[1:2], build_tokenizer(), ShotTemplate(), torch.device("cpu")) is None


@pytest.mark.parametrize("scope", ["all", "padding"])
@pytest.mark.parametrize("answers_only", [False, True])
def test_the_term_ranks_options_by_their_mean_logprob_after_the_query(scope, answers_only):
    torch.manual_seed(0)
    tok, template = build_tokenizer(), ShotTemplate()
    model = make_pgm("llama", "prefix", lora_scope=scope).eval()
    module = EpisodeLoss(model, tok, gradient_from_answers_only=answers_only, option_ranking_weight=0.5)
    with torch.no_grad():
        losses = module(episode())
        prompt = model.generate_prompt(SHOTS, tokenizer=tok, num_demonstrations=1)
        expected_losses, hits = [], []
        for example in (QUERIES[0], QUERIES[2]):
            query = encode(tok, template.format_query(example.input))
            scores = []
            for option in example.options:
                option_ids = encode(tok, template.format_answer(option))
                logits = model(prompt=prompt, input_ids=torch.cat([query, option_ids]).unsqueeze(0)).logits[0]
                logprobs = F.log_softmax(logits[len(query) - 1 : -1].float(), dim=-1)
                scores.append(logprobs[torch.arange(len(option_ids)), option_ids].mean())
            scores = torch.stack(scores)
            right = [i for i, option in enumerate(example.options) if option in example.answers]
            expected_losses.append(torch.logsumexp(scores, 0) - torch.logsumexp(scores[right], 0))
            hits.append(float(int(scores.argmax()) in right))
    assert losses["option_ranking"].item() == pytest.approx(torch.stack(expected_losses).mean().item(), abs=1e-4)
    assert losses["option_accuracy"].item() == pytest.approx(sum(hits) / 2)
    assert losses["loss"].item() == pytest.approx(losses["lm_loss"].item() + 0.5 * losses["option_ranking"].item(), rel=1e-5)


def test_the_term_alone_trains_lora_and_padding_and_needs_multiple_choice():
    model = make_pgm("llama", "prefix", padding_reparameterization="mlp", lora_scope="padding").train()
    module = EpisodeLoss(model, build_tokenizer(), gradient_from_answers_only=True, option_ranking_weight=1.0)
    module(episode())["option_ranking"].backward()
    assert_lora_and_padding_have_gradients(model)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n and "metal_padding" not in n)
    generative_only = module(episode(QUERIES[1:2]))
    assert "option_ranking" not in generative_only and "option_accuracy" not in generative_only


def test_a_run_logs_the_term_and_its_dev_accuracy_and_a_negative_weight_is_refused(tmp_path):
    with pytest.raises(ValueError, match="option_ranking_weight must be >= 0"):
        TrainingArguments(option_ranking_weight=-1.0)
    log = train_on_a_labelled_task(tmp_path, option_ranking_weight=2.0)
    trained = [record for record in log if "loss" in record]
    assert trained and all({"lm_loss", "option_ranking", "option_accuracy"} <= set(record) for record in trained)
    for record in trained:
        assert record["loss"] == pytest.approx(record["lm_loss"] + 2.0 * record["option_ranking"], rel=1e-5)
        assert 0 <= record["option_accuracy"] <= 1
    evaluated = [record for record in log if "dev_loss" in record]
    assert [record["step"] for record in evaluated] == [0, 2]
    assert all(0 <= record["dev_option_accuracy"] <= 1 and record["dev_option_ranking"] > 0 for record in evaluated)


def test_a_query_with_many_options_is_ranked_against_a_seeded_sample_of_distractors():
    many = Example("pick", "o7", alternatives=("o3",), options=tuple(f"o{i}" for i in range(20)))
    ranked = ranked_options(many, max_options=5)
    assert len(ranked) == 5 and {"o3", "o7"} <= set(ranked)
    assert ranked == sorted(ranked, key=lambda option: int(option[1:]))  # the options' own order
    assert ranked_options(many, max_options=5) == ranked  # the same draw every time (exact resume)
    assert ranked_options(many, max_options=20) == list(many.options)
    options = encode_option_queries([many], build_tokenizer(), ShotTemplate(), torch.device("cpu"), max_options=5)
    assert options.groups == [[0, 1, 2, 3, 4]] and [ranked[i] for i in options.correct[0]] == ["o3", "o7"]
