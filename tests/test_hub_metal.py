"""A MetaL-Prompt PGM shared through the Hub: push_to_hub and from_pretrained("user/repo") over real HTTP against
the loopback Hub stand-in (tests/hub_stub.py), with huggingface_hub, transformers and PEFT unmodified."""

from __future__ import annotations

import pytest
import torch
from peft import PeftConfig, PeftModel

from peft_metal import MetaLPromptConfig

try:
    from conftest_hub import hub  # noqa: F401  (fixture)
except ImportError:  # tests/ imported as a package
    from tests.conftest_hub import hub  # noqa: F401

from conftest import SHOTS, make_lm, make_pgm

REPO = "user/metal-pgm"


def test_push_to_hub_and_load_back_identical_prompts(hub, tok):
    model = make_pgm("llama", "prefix")
    with torch.no_grad():
        for parameter in model.base_model.metal_padding.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    model.eval()
    expected = model.generate_prompt(SHOTS, tokenizer=tok)

    model.push_to_hub(REPO)
    files = hub.files(REPO)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)

    config = PeftConfig.from_pretrained(REPO)
    assert isinstance(config, MetaLPromptConfig) and config.prompt_design == "prefix"
    loaded = PeftModel.from_pretrained(make_lm("llama"), REPO).eval()
    actual = loaded.generate_prompt(SHOTS, tokenizer=tok)
    assert torch.allclose(actual.keys, expected.keys, atol=1e-6)
    assert torch.allclose(actual.values, expected.values, atol=1e-6)


def test_push_pgm_to_hub_keeps_the_metal_prompt_model_card(hub, tok):
    """`model.push_to_hub` ends with transformers' card; `push_pgm_to_hub` uploads the card save_pretrained wrote."""
    from peft_metal import push_pgm_to_hub

    model = make_pgm("llama", "discrete").eval()
    expected = model.generate_prompt(SHOTS, tokenizer=tok)
    push_pgm_to_hub(model, "user/metal-card")
    card = hub.files("user/metal-card")["README.md"].decode()
    assert "MetaL-Prompt" in card and "discrete" in card and "metal-prompt" in card  # the section and its tag
    loaded = PeftModel.from_pretrained(make_lm("llama"), "user/metal-card").eval()
    assert loaded.generate_prompt(SHOTS, tokenizer=tok).token_ids.tolist() == expected.token_ids.tolist()

    with pytest.raises(TypeError, match="MetaL-Prompt PGMs"):
        push_pgm_to_hub(make_lm("llama"), "user/not-a-pgm")
