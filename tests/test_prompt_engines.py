"""Prompts on existing engines: a discrete prompt as plain text (`peft-metal prompt`, GET /v1/prompts/{id}) and soft
prompts as the input embeddings vLLM and SGLang accept (`GeneratedPrompt.to_prompt_embeds`)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHOTS, build_tokenizer, encode, make_lm, make_pgm

from peft_metal.cli import main


@pytest.mark.parametrize("design", ["discrete", "weighted_sum", "hidden_state"])
@pytest.mark.parametrize("num_demonstrations", [0, 1])
def test_prompt_embeds_give_the_logits_of_reading_the_prompt(design, num_demonstrations):
    tok = build_tokenizer()
    model = make_pgm("llama", design)
    prompt = model.generate_prompt(SHOTS, tokenizer=tok, num_demonstrations=num_demonstrations)
    query = encode(tok, "Input: nice\nOutput:")
    lm = make_lm("llama")
    with torch.no_grad():
        embeds = prompt.to_prompt_embeds(lm, query)
        assert embeds.shape == (prompt.context_length + len(query), lm.config.hidden_size)
        expected = model(prompt=prompt, input_ids=query.unsqueeze(0)).logits[0]
        got = lm(inputs_embeds=embeds.unsqueeze(0)).logits[0, -len(query) :]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        batch = prompt.to_prompt_embeds(lm, torch.stack([query, query]))
        torch.testing.assert_close(batch[1], embeds)


def test_prefix_prompts_cannot_become_embeddings():
    tok = build_tokenizer()
    prompt = make_pgm("llama", "prefix").generate_prompt(SHOTS, tokenizer=tok)
    with pytest.raises(ValueError, match="keys and values for every layer"):
        prompt.to_prompt_embeds(make_lm("llama"), torch.tensor([5, 6]))


def test_peft_metal_prompt_prints_a_discrete_prompt_as_text(tmp_path, capsys):
    from peft_metal import GeneratedPrompt

    make_lm("llama").save_pretrained(tmp_path / "model")
    build_tokenizer().save_pretrained(tmp_path / "model")
    make_pgm("llama", "discrete").save_pretrained(tmp_path / "pgm")
    shots = tmp_path / "shots.jsonl"
    shots.write_text("".join(json.dumps({"input": x, "output": y}) + "\n" for x, y in SHOTS))
    code = main(["prompt", "--shots", str(shots), "--model", str(tmp_path / "model"), "--pgm", str(tmp_path / "pgm"),
                 "--num-demonstrations", "1", "--output", str(tmp_path / "p.safetensors")])
    assert code == 0
    saved = GeneratedPrompt.load(tmp_path / "p.safetensors")
    assert capsys.readouterr().out == saved.text + "Input: great\nOutput: positive\n\n"
    assert main(["prompt", "--shots", str(tmp_path / "missing.jsonl"), "--model", str(tmp_path / "model")]) == 2

    # refined, the prompt is tuned embeddings: saved, not printed as text
    common = ["prompt", "--shots", str(shots), "--model", str(tmp_path / "model"), "--pgm", str(tmp_path / "pgm")]
    assert main([*common, "--refine-steps", "2", "--output", str(tmp_path / "r.safetensors")]) == 0
    out = capsys.readouterr()
    refined = GeneratedPrompt.load(tmp_path / "r.safetensors")
    assert out.out == "" and "refined discrete prompt" in out.err and not refined.is_text
    assert [record["steps"] for record in refined.refinement] == [2]
    assert main([*common, "--refine-steps", "-1"]) == 2 and "steps >= 0" in capsys.readouterr().err
