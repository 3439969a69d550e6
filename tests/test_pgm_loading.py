"""The public ways to a PGM: `load_pretrained_pgm` (an LM with a meta-trained PGM, in one call), `get_peft_model` (a
fresh one) and `attach_pgm` (a saved one on a plain LM), each without a warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import SHOTS, K, make_lm

import peft_metal
from peft_metal import MetaLPromptConfig, get_peft_model, load_pretrained_pgm
from peft_metal.pgm import attach_pgm


def _fresh(lm):
    torch.manual_seed(0)
    config = MetaLPromptConfig(task_type="CAUSAL_LM", prompt_design="prefix", num_prompt_tokens=K, r=4,
                               init_lora_weights=False)
    return get_peft_model(lm, config).eval()


def test_make_save_and_load_a_pgm_without_a_warning(tmp_path, tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = _fresh(make_lm("llama"))
        expected = model.generate_prompt(SHOTS, tokenizer=tok)
        model.save_pretrained(tmp_path / "pgm", save_embedding_layers=False)
        loaded = attach_pgm(make_lm("llama"), tmp_path / "pgm").eval()
    assert torch.equal(loaded.generate_prompt(SHOTS, tokenizer=tok).keys, expected.keys)


def test_attach_pgm_refuses_an_lm_that_already_carries_one(tmp_path):
    lm = make_lm("llama")
    _fresh(lm).save_pretrained(tmp_path / "pgm", save_embedding_layers=False)  # get_peft_model wrapped `lm` in place
    with pytest.raises(ValueError, match="already carries a PGM"):
        attach_pgm(lm, tmp_path / "pgm")


def test_load_pretrained_pgm_is_one_call_and_never_untrained(tmp_path, tok):
    make_lm("llama").save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    pgm = _fresh(make_lm("llama"))
    pgm.save_pretrained(tmp_path / "pgm", save_embedding_layers=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, tokenizer = load_pretrained_pgm(str(tmp_path / "lm"), pgm=tmp_path / "pgm")
    assert not model.training and peft_metal.load_pretrained_pgm is load_pretrained_pgm
    prompt = model.generate_prompt(SHOTS, tokenizer=tokenizer)
    assert torch.allclose(prompt.keys, pgm.generate_prompt(SHOTS, tokenizer=tok).keys, atol=1e-6)
    with pytest.raises(ValueError, match="No PGM is shipped"):
        load_pretrained_pgm(str(tmp_path / "lm"))
