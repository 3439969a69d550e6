"""Gradient refinement of a generated prompt, and iterative generation over more shots than fit the context."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import DESIGNS, SHOTS, K, make_pgm

from peft_metal import GeneratedPrompt, Refinement
from peft_metal.metal_prompt.queries import answer_tokens, encode_queries, split_by_tokens
from peft_metal.metal_prompt.refine import DEFAULT_LR, _RotatingDemonstrations, refine

pytestmark = pytest.mark.one_thread  # tiny models (conftest)


def shot_loss(model, prompt, tok, shots) -> float:
    batch = encode_queries(shots, tok, model.base_model.template, torch.device("cpu"))
    with torch.no_grad():
        return model(prompt=prompt, input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss.item()


@pytest.mark.parametrize("design", DESIGNS)
def test_refinement_lowers_the_loss_and_leaves_the_models_alone(design, tok, tmp_path):
    model = make_pgm("llama", design)
    before_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        prompt = model.generate_prompt(SHOTS, tokenizer=tok, num_demonstrations=1)
    refined = model.refine_prompt(prompt, SHOTS, tokenizer=tok, steps=15, lr=5e-2)

    assert isinstance(refined, GeneratedPrompt) and refined is not prompt
    assert refined.design == design and refined.num_tokens == K
    assert torch.equal(refined.demonstrations, prompt.demonstrations)
    assert shot_loss(model, refined, tok, SHOTS) < shot_loss(model, prompt, tok, SHOTS) - 0.05
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before_weights[name]), name
    if design == "discrete":  # a refined discrete prompt is a soft prompt that keeps its tokens for reference
        assert torch.equal(refined.token_ids, prompt.token_ids) and refined.embeds is not None
        assert prompt.is_text and not refined.is_text
    assert prompt.refinement == []
    assert refined.refinement == [{"steps": 15, "lr": 5e-2, "batch_size": 8, "seed": 0, "num_shots": len(SHOTS)}]
    refined.save(tmp_path / "refined.safetensors")
    loaded = GeneratedPrompt.load(tmp_path / "refined.safetensors")
    assert shot_loss(model, loaded, tok, SHOTS) == pytest.approx(shot_loss(model, refined, tok, SHOTS), abs=1e-5)
    assert loaded.refinement == refined.refinement
    twice = model.refine_prompt(loaded, SHOTS, tokenizer=tok, steps=1, lr=1e-2, seed=3)
    assert [record["steps"] for record in twice.refinement] == [15, 1] and twice.refinement[1]["seed"] == 3


def test_an_unrefined_prompt_file_has_no_refinement_key(tok, tmp_path):
    """So files of unrefined prompts stay readable by versions from before refinement was recorded."""
    from safetensors import safe_open

    model = make_pgm("llama", "prefix")
    with torch.no_grad():
        model.generate_prompt(SHOTS, tokenizer=tok).save(tmp_path / "p.safetensors")
    with safe_open(tmp_path / "p.safetensors", framework="pt") as reader:
        assert "refinement" not in reader.metadata()


@pytest.mark.parametrize("design", ["discrete", "prefix"])
def test_the_default_rate(design, tok):
    model = make_pgm("llama", design)
    with torch.no_grad():
        prompt = model.generate_prompt(SHOTS, tokenizer=tok)
    default = model.refine_prompt(prompt, SHOTS, tokenizer=tok, steps=2)
    explicit = model.refine_prompt(prompt, SHOTS, tokenizer=tok, steps=2, lr=DEFAULT_LR)
    assert default.refinement[0]["lr"] == DEFAULT_LR == Refinement(2).resolved().lr
    for name in ("embeds", "keys", "values"):
        if getattr(default, name) is not None:
            assert torch.equal(getattr(default, name), getattr(explicit, name)), name


@pytest.mark.parametrize("scope", ["all", "padding"])
def test_generate_prompt_refines_on_the_shots_the_pgm_read(scope, tok):
    """`generate_prompt(refinement=...)` is the PGM's prompt refined on XP only, under no_grad too (the usual call)."""
    model = make_pgm("llama", "prefix", lora_scope=scope)
    with torch.no_grad():
        refined = model.generate_prompt(SHOTS, tokenizer=tok, num_demonstrations=1, refinement=Refinement(3, 5e-2, 2, 1))
        prompt = model.generate_prompt(SHOTS, tokenizer=tok, num_demonstrations=1)
    by_hand = model.refine_prompt(prompt, SHOTS[:-1], tokenizer=tok, steps=3, lr=5e-2, batch_size=2, seed=1)
    on_all = model.refine_prompt(prompt, SHOTS, tokenizer=tok, steps=3, lr=5e-2, batch_size=2, seed=1)
    assert torch.equal(refined.keys, by_hand.keys) and torch.equal(refined.values, by_hand.values)
    assert not torch.equal(refined.keys, on_all.keys)
    assert torch.equal(refined.demonstrations, prompt.demonstrations)
    assert refined.refinement == [{"steps": 3, "lr": 5e-2, "batch_size": 2, "seed": 1, "num_shots": len(SHOTS) - 1}]


def test_rotating_demonstrations_learn_from_every_shot(tok):
    """With `demonstration_shots`, each step draws its demonstrations from all the shots and its minibatch from the
    others: no shot is ever both, every shot is learnt from, and the prompt keeps the demonstrations it is served with."""
    model = make_pgm("llama", "prefix")
    template = model.base_model.template
    shots = [("good movie", "positive"), ("bad film", "negative"), ("great", "positive"), ("dull", "negative"),
             ("fine", "positive")]
    read, kept = shots[:3], shots[3:]
    rotation = _RotatingDemonstrations(read, kept, tok, template)
    order = random.Random(0)
    as_demonstration, as_target = set(), set()
    for _ in range(40):
        batch, demonstration_ids = rotation.draw(order, 2, torch.device("cpu"))
        demonstrations = "".join(tok.convert_ids_to_tokens(demonstration_ids.tolist()))
        drawn = [shot for shot in shots if template.format_shots([shot]) in demonstrations]
        assert len(drawn) == len(kept) and len(batch) == 2 and not set(drawn) & set(batch)
        as_demonstration.update(drawn)
        as_target.update(batch)
    assert as_demonstration == as_target == set(shots)

    with torch.no_grad():
        prompt = model.generate_prompt(shots, tokenizer=tok, num_demonstrations=len(kept))
    with model.base_model._lora(False):
        fixed = refine(model.get_base_model(), prompt, read, tok, template, steps=3, lr=5e-2, batch_size=2)
        rotated = refine(model.get_base_model(), prompt, read, tok, template, steps=3, lr=5e-2, batch_size=2,
                         demonstration_shots=kept)
    assert torch.equal(rotated.demonstrations, prompt.demonstrations)
    assert not torch.equal(rotated.keys, fixed.keys) and not torch.equal(rotated.keys, prompt.keys)
    assert rotated.refinement[-1]["rotated_demonstrations"] == len(kept)
    with pytest.raises(ValueError, match="besides them"):
        _RotatingDemonstrations([], kept, tok, template)


def test_with_demonstrations_replaces_them_in_the_pgms_template(tok):
    model = make_pgm("llama", "prefix")
    with torch.no_grad():
        prompt = model.generate_prompt(SHOTS, tokenizer=tok, num_demonstrations=2)
    again = model.with_demonstrations(prompt, SHOTS[-2:], tok)
    assert torch.equal(again.demonstrations, prompt.demonstrations)
    assert again.demonstrations_text == prompt.demonstrations_text
    one = model.with_demonstrations(prompt, [{"input": "odd one", "output": "yes"}], tok)
    assert one.demonstrations_text == model.base_model.template.format_shot(("odd one", "yes"))
    assert one.demonstrations.tolist() == tok(one.demonstrations_text, add_special_tokens=False)["input_ids"]
    assert model.with_demonstrations(prompt, [], tok).context_length == K
    with pytest.raises(TypeError, match="not an \\(input, output\\) pair"):
        model.with_demonstrations(prompt, ["lonely"], tok)


def test_bad_refinement_settings(tok):
    for bad, error in (
        (dict(steps=-1), ValueError), (dict(steps=2, lr=0), ValueError), (dict(steps=2, batch_size=0), ValueError),
        (dict(steps=2.5), TypeError), (dict(steps=True), TypeError), (dict(steps=2, lr="fast"), ValueError),
    ):
        with pytest.raises(error, match="refinement"):
            Refinement(**bad)
    model = make_pgm("llama", "prefix")
    with pytest.raises(TypeError, match="Refinement"):
        model.generate_prompt(SHOTS, tokenizer=tok, refinement=5)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        model.generate_prompt(SHOTS, tokenizer=tok, refinement=Refinement(1))


def test_refinement_rejects_bad_settings(tok):
    model = make_pgm("llama", "prefix")
    with torch.no_grad():
        prompt = model.generate_prompt(SHOTS, tokenizer=tok)
    with pytest.raises(ValueError, match="lr"):
        model.refine_prompt(prompt, SHOTS, tokenizer=tok, steps=2, lr=0)
    with pytest.raises(ValueError, match="No shots"):
        model.refine_prompt(prompt, [], tokenizer=tok)


def test_a_minibatch_read_in_pieces_is_the_same_step(tok):
    """Long shots are refined in pieces of at most max_batch_tokens (gradients summed by answer share): the same
    prompt as one pass over the minibatch, with the memory of the largest piece."""
    shots = [("a b c d e f g h i j k", "x y z"), ("m", "n"), ("o p", "q"), ("r s t u", "v w")]
    batch = encode_queries(shots, tok, make_pgm("llama", "prefix").base_model.template, torch.device("cpu"))
    budget = batch.input_ids.shape[1]  # the long row's length: it goes alone, the short rows share pieces
    pieces = split_by_tokens(batch, budget)
    assert pieces[0].input_ids.shape[0] == 1 and 2 <= len(pieces) < 4
    assert all(piece.input_ids.numel() <= budget for piece in pieces)
    assert all(piece.attention_mask[:, 0].any() for piece in pieces)  # trimmed: no column of padding only
    rows = [row[mask.bool()] for piece in pieces for row, mask in zip(piece.input_ids, piece.attention_mask)]
    assert all(torch.equal(row, original[mask.bool()]) for row, original, mask in zip(rows, batch.input_ids, batch.attention_mask))
    assert sum(answer_tokens(piece) for piece in pieces) == answer_tokens(batch)
    assert [piece.input_ids.shape[0] for piece in split_by_tokens(batch, 1)] == [1, 1, 1, 1]

    model = make_pgm("llama", "prefix")
    with torch.no_grad():
        prompt = model.generate_prompt(shots, tokenizer=tok)
    template = model.base_model.template
    with model.base_model._lora(False):
        whole = refine(model.get_base_model(), prompt, shots, tok, template, steps=3, lr=5e-2, batch_size=4, max_batch_tokens=10_000)
        in_rows = refine(model.get_base_model(), prompt, shots, tok, template, steps=3, lr=5e-2, batch_size=4, max_batch_tokens=1)
    assert not torch.allclose(whole.keys, prompt.keys)
    torch.testing.assert_close(in_rows.keys, whole.keys, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(in_rows.values, whole.values, atol=1e-5, rtol=1e-4)


def many_shots(n: int) -> list[tuple[str, str]]:
    return [(f"w{i % 10}{i % 7}", "even" if i % 2 == 0 else "odd") for i in range(n)]


@pytest.mark.parametrize("design", DESIGNS)
def test_two_hundred_shots_are_folded_in_chunks(design, tok):
    model = make_pgm("llama", design)  # 256 positions: 200 shots (about 3000 tokens) never fit at once
    shots = many_shots(200)
    with pytest.raises(ValueError, match="chunk_size='auto'"):
        model.generate_prompt(shots, tokenizer=tok)
    with torch.no_grad():
        prompt = model.generate_prompt(shots, tokenizer=tok, chunk_size="auto")
        first_chunk_only = model.generate_prompt(shots[:10], tokenizer=tok)
    assert prompt.num_tokens == K
    payload = prompt.keys if design == "prefix" else (prompt.token_ids if design == "discrete" else prompt.embeds)
    other = first_chunk_only.keys if design == "prefix" else (first_chunk_only.token_ids if design == "discrete" else first_chunk_only.embeds)
    assert payload.shape == other.shape
    assert design == "discrete" or not torch.allclose(payload, other)


def test_explicit_chunks_read_the_previous_prompt(tok):
    """Two chunks equal one PGM pass over chunk 2 that starts from the prompt of chunk 1 (checked by hand)."""
    model = make_pgm("llama", "hidden_state")
    shots = many_shots(6)
    with torch.no_grad():
        folded = model.generate_prompt(shots, tokenizer=tok, chunk_size=3)
        first = model.generate_prompt(shots[:3], tokenizer=tok)
        template = model.base_model.template
        ids = torch.tensor(tok(template.format_shots(shots[3:]), add_special_tokens=False)["input_ids"])
        by_hand = model.base_model._run_pgm(ids, False, previous=first).hidden_states
    torch.testing.assert_close(folded.embeds, by_hand)


def test_prompt_passes_run_one_chunk_per_next(tok):
    """The stepwise form the service interleaves with completions: one PGM pass per `next()`, the last yield is
    `generate_prompt`'s prompt (demonstrations included); bad arguments are refused at the call, before any pass."""
    model = make_pgm("llama", "hidden_state")
    shots = many_shots(7)
    with torch.no_grad():
        passes = model.prompt_passes(shots, tok, num_demonstrations=1, chunk_size=3)
        prompts = list(passes)
        whole = model.generate_prompt(shots, tokenizer=tok, num_demonstrations=1, chunk_size=3)
    assert len(prompts) == 2 and prompts[0].demonstrations.numel() == 0
    torch.testing.assert_close(prompts[-1].embeds, whole.embeds)
    assert torch.equal(prompts[-1].demonstrations, whole.demonstrations)
    with pytest.raises(ValueError, match="num_demonstrations"):
        model.prompt_passes(shots, tok, num_demonstrations=7)


def test_prompt_tuning_step_by_step_is_refine_prompt(tok):
    """`prompt_tuning` takes one Adam step per call; stepped to
    the end it is `refine_prompt` exactly, and it refuses a step too many or a result too early."""
    model = make_pgm("llama", "prefix")
    with torch.no_grad():
        prompt = model.generate_prompt(SHOTS, tokenizer=tok)
    whole = model.refine_prompt(prompt, SHOTS, tokenizer=tok, steps=3)
    tuning = model.prompt_tuning(prompt, SHOTS, tokenizer=tok, steps=3)
    with pytest.raises(RuntimeError, match="step 0 of 3"):
        tuning.result()
    with torch.no_grad():
        losses = [tuning.step() for _ in range(3)]
    assert tuning.done and tuning.steps_done == 3 and all(loss > 0 for loss in losses)
    with pytest.raises(RuntimeError, match="done"):
        tuning.step()
    stepped = tuning.result()
    assert torch.equal(stepped.keys, whole.keys) and torch.equal(stepped.values, whole.values)
    assert stepped.refinement == whole.refinement


def test_chunked_training_reaches_every_chunk(tok):
    model = make_pgm("llama", "weighted_sum")
    model.train()
    prompt = model.generate_prompt(many_shots(6), tokenizer=tok, chunk_size=2)
    batch = encode_queries(SHOTS, tok, model.base_model.template, torch.device("cpu"))
    model(prompt=prompt, input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss.backward()
    padding = model.base_model.metal_padding["default"]
    assert padding.embedding.grad is not None and padding.embedding.grad.abs().sum() > 0


@pytest.mark.parametrize("scope", ["all", "padding"])
def test_chunked_training_reaches_the_first_chunk_in_both_scopes(tok, scope):
    """The gradient of the loss reaches the prompt made from the first chunk, through the later chunks' passes."""
    model = make_pgm("llama", "weighted_sum", lora_scope=scope)
    model.train()
    made = []
    original = model.base_model._prompt_from_readout

    def recording(readout, tokenizer):
        prompt = original(readout, tokenizer)
        prompt.embeds.retain_grad()
        made.append(prompt)
        return prompt

    model.base_model._prompt_from_readout = recording
    prompt = model.generate_prompt(many_shots(6), tokenizer=tok, chunk_size=2)
    assert len(made) == 3
    batch = encode_queries(SHOTS, tok, model.base_model.template, torch.device("cpu"))
    model(prompt=prompt, input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss.backward()
    assert made[0].embeds.grad is not None and made[0].embeds.grad.abs().sum() > 0


def test_bad_chunk_size(tok):
    model = make_pgm("llama", "prefix")
    for bad in (0, -1, "all", 1.5):
        with pytest.raises(ValueError, match="chunk_size"):
            model.generate_prompt(SHOTS, tokenizer=tok, chunk_size=bad)


@pytest.mark.parametrize("reparameterization", ["lstm", "mlp"])
def test_baked_padding_makes_the_same_prompts_and_a_smaller_adapter(reparameterization, tok, tmp_path):
    from conftest import make_lm
    from peft import PeftModel

    model = make_pgm("llama", "hidden_state", padding_reparameterization=reparameterization)
    with torch.no_grad():
        for parameter in model.base_model.metal_padding.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
        expected = model.generate_prompt(SHOTS, tokenizer=tok)
    model.save_pretrained(tmp_path / "full")
    model.base_model.bake_padding()
    model.save_pretrained(tmp_path / "baked")
    loaded = PeftModel.from_pretrained(make_lm("llama"), tmp_path / "baked").eval()
    with torch.no_grad():
        actual = loaded.generate_prompt(SHOTS, tokenizer=tok)
    torch.testing.assert_close(actual.embeds, expected.embeds)
    assert loaded.peft_config["default"].padding_reparameterization == "none"
    full_size = (tmp_path / "full" / "adapter_model.safetensors").stat().st_size
    assert (tmp_path / "baked" / "adapter_model.safetensors").stat().st_size < full_size / 2
