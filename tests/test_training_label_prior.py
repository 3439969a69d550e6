"""The label-prior term (`label_prior_weight`): on an episode whose queries share one label set, a KL from XP's label
distribution (add-one smoothed) to the mean over queries of each query's softmax over its options, scored as
evaluation ranks them; nothing on episodes without one shared label set."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_lora_and_padding_have_gradients,
    build_tokenizer,
    encode,
    make_pgm,
    train_on_a_labelled_task,
)

from peft_metal.data import Episode, Example
from peft_metal.metal_prompt import ShotTemplate
from peft_metal.training import EpisodeLoss, TrainingArguments
from peft_metal.training.options import label_distribution, shared_option_list

LABELS = ("no", "yes", "maybe")
XP = [Example("good", "yes", options=LABELS), Example("fine", "yes", options=LABELS), Example("bad", "no", options=LABELS)]
QUERIES = [Example("great", "yes", options=LABELS), Example("awful", "no", options=LABELS)]


def episode(queries=QUERIES, xp=XP) -> Episode:
    return Episode("t", xp=list(xp), xl=[Example("ok", "maybe", options=LABELS)], queries=list(queries))


def test_the_target_counts_xp_outputs_add_one_smoothed_and_needs_one_shared_label_set():
    assert torch.allclose(label_distribution(XP, LABELS), torch.tensor([2, 3, 1]) / 6)
    assert label_distribution([Example("x", "other")], LABELS) is None
    assert shared_option_list(QUERIES) == LABELS
    reordered = Example("meh", "no", options=("yes", "no", "maybe"))
    assert shared_option_list([QUERIES[0], reordered]) is None
    assert shared_option_list([QUERIES[0], Example("free text", "whatever")]) is None
    assert shared_option_list([Example("pick", "o1", options=tuple(f"o{i}" for i in range(9)))]) is None


@pytest.mark.parametrize("scope", ["all", "padding"])
def test_the_term_is_the_kl_from_xp_labels_to_the_queries_mean_option_distribution(scope):
    torch.manual_seed(0)
    tok, template = build_tokenizer(), ShotTemplate()
    model = make_pgm("llama", "prefix", lora_scope=scope).eval()
    module = EpisodeLoss(model, tok, gradient_from_answers_only=True, label_prior_weight=0.5)
    with torch.no_grad():
        losses = module(episode())
        shots = [example.as_shot() for example in XP] + [("ok", "maybe")]
        prompt = model.generate_prompt(shots, tokenizer=tok, num_demonstrations=1)
        chosen = []
        for example in QUERIES:
            query = encode(tok, template.format_query(example.input))
            scores = []
            for option in LABELS:
                option_ids = encode(tok, template.format_answer(option))
                logits = model(prompt=prompt, input_ids=torch.cat([query, option_ids]).unsqueeze(0)).logits[0]
                logprobs = F.log_softmax(logits[len(query) - 1 : -1].float(), dim=-1)
                scores.append(logprobs[torch.arange(len(option_ids)), option_ids].mean())
            chosen.append(F.softmax(torch.stack(scores), dim=0))
        mean = torch.stack(chosen).mean(dim=0)
        target = torch.tensor([2, 3, 1]) / 6
        expected = (target * (target / mean).log()).sum()
    assert losses["label_prior"].item() == pytest.approx(expected.item(), abs=1e-4)
    assert "option_ranking" not in losses
    assert losses["loss"].item() == pytest.approx(losses["lm_loss"].item() + 0.5 * losses["label_prior"].item(), rel=1e-5)


def test_the_term_alone_trains_lora_and_padding_and_is_left_out_without_a_shared_label_set():
    model = make_pgm("llama", "prefix", padding_reparameterization="mlp", lora_scope="padding").train()
    module = EpisodeLoss(model, build_tokenizer(), gradient_from_answers_only=True, label_prior_weight=1.0)
    module(episode())["label_prior"].backward()
    assert_lora_and_padding_have_gradients(model)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n and "metal_padding" not in n)
    mixed = [QUERIES[0], Example("pick", "b", options=("a", "b"))]
    assert "label_prior" not in module(episode(mixed))
    assert "label_prior" not in module(episode(xp=[Example("good", "fine")]))  # XP's output is not a label


def test_a_run_logs_the_term_on_train_and_dev_and_a_negative_weight_is_refused(tmp_path):
    with pytest.raises(ValueError, match="label_prior_weight must be >= 0"):
        TrainingArguments(label_prior_weight=-1.0)
    log = train_on_a_labelled_task(tmp_path, label_prior_weight=2.0)
    trained = [record for record in log if "loss" in record]
    assert trained and all({"lm_loss", "label_prior"} <= set(record) for record in trained)
    for record in trained:
        assert record["loss"] == pytest.approx(record["lm_loss"] + 2.0 * record["label_prior"], rel=1e-5)
        assert record["label_prior"] >= 0
    evaluated = [record for record in log if "dev_loss" in record]
    assert all(record["dev_label_prior"] >= 0 for record in evaluated)
