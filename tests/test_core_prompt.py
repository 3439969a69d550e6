"""GeneratedPrompt as an artifact: save/load, dtype moves, refusing foreign files and foreign base models."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import DESIGNS, FAMILIES, QUERIES, SHOTS, K, encode, make_lm, make_pgm
from safetensors.torch import save_file

from peft_metal import GeneratedPrompt

TENSORS = ("token_ids", "embeds", "keys", "values", "demonstrations")


@pytest.fixture(scope="module")
def prompts(tok):
    """One eval-mode prompt (with a demonstration) per design, on the Llama base."""
    out = {}
    for design in DESIGNS:
        model = make_pgm("llama", design)
        with torch.no_grad():
            out[design] = model.generate_prompt(SHOTS, tokenizer=tok, num_demonstrations=1)
    return out


def assert_identical(a: GeneratedPrompt, b: GeneratedPrompt) -> None:
    for name in TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert torch.equal(x, y), name
    for name in ("design", "num_tokens", "base_fingerprint", "pgm_config", "text", "demonstrations_text"):
        assert getattr(a, name) == getattr(b, name), name


@pytest.mark.parametrize("design", DESIGNS)
def test_save_load_round_trip(design, prompts, tmp_path):
    prompt = prompts[design]
    assert prompt.num_demonstration_tokens > 0
    path = tmp_path / "prompt.safetensors"
    prompt.save(path)
    loaded = GeneratedPrompt.load(path)
    assert_identical(prompt, loaded)
    # str paths work too
    prompt.save(str(tmp_path / "p2.safetensors"))
    assert_identical(prompt, GeneratedPrompt.load(str(tmp_path / "p2.safetensors")))


@pytest.mark.parametrize("design", DESIGNS)
def test_loaded_prompt_reads_the_same(design, prompts, tok, tmp_path):
    model = make_pgm("llama", design)
    prompt = prompts[design]
    prompt.save(tmp_path / "p.safetensors")
    loaded = GeneratedPrompt.load(tmp_path / "p.safetensors")
    query = encode(tok, QUERIES[0]).unsqueeze(0)
    with torch.no_grad():
        a = model(prompt=prompt, input_ids=query).logits
        b = model(prompt=loaded, input_ids=query).logits
    assert torch.equal(a, b)


def test_save_without_demonstrations_and_train_mode_prompt(tok, tmp_path):
    model = make_pgm("llama", "discrete").train()
    prompt = model.generate_prompt(SHOTS, tokenizer=tok)  # carries straight-through embeds with a graph
    assert prompt.num_demonstration_tokens == 0
    prompt.save(tmp_path / "p.safetensors")
    loaded = GeneratedPrompt.load(tmp_path / "p.safetensors")
    assert torch.equal(loaded.token_ids, prompt.token_ids)
    assert loaded.demonstrations.shape == (0,) and loaded.demonstrations.dtype == torch.long
    assert loaded.text == prompt.text


@pytest.mark.parametrize("design", DESIGNS)
def test_to_bfloat16_casts_floats_only(design, prompts):
    prompt = prompts[design]
    moved = prompt.to(dtype=torch.bfloat16)
    assert moved is not prompt
    for name in TENSORS:
        tensor = getattr(moved, name)
        if tensor is None:
            continue
        original = getattr(prompt, name)
        if original.is_floating_point():
            assert tensor.dtype == torch.bfloat16, name
            torch.testing.assert_close(tensor.float(), original, atol=1e-2, rtol=1e-2)
        else:
            assert tensor.dtype == original.dtype == torch.long, name
            assert torch.equal(tensor, original)
    # the original is untouched
    assert all(getattr(prompt, n) is None or getattr(prompt, n).dtype != torch.bfloat16 for n in TENSORS)
    assert moved.to(device="cpu").design == design


@pytest.mark.parametrize("design", DESIGNS)
def test_bf16_prompt_is_read_by_fp32_model(design, prompts, tok):
    model = make_pgm("llama", design)
    query = encode(tok, QUERIES[0]).unsqueeze(0)
    with torch.no_grad():
        out = model(prompt=prompts[design].to(dtype=torch.bfloat16), input_ids=query).logits
        ref = model(prompt=prompts[design], input_ids=query).logits
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.1)


# ------------------------------------------------------------------------------------------ refusing bad files


def test_load_random_bytes(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="junk.safetensors"):
        GeneratedPrompt.load(path)


def test_load_small_header_garbage(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes((16).to_bytes(8, "little") + b"{not json at all" + b"\x00" * 8)
    with pytest.raises(ValueError):
        GeneratedPrompt.load(path)


def test_load_pickle(tmp_path, prompts):
    path = tmp_path / "prompt.pt"
    torch.save({"keys": prompts["prefix"].keys}, path)
    with pytest.raises(ValueError):
        GeneratedPrompt.load(path)
    path2 = tmp_path / "whole.pt"
    torch.save(prompts["prefix"], path2)
    with pytest.raises(ValueError):
        GeneratedPrompt.load(path2)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_load_truncated(keep, prompts, tmp_path):
    path = tmp_path / "p.safetensors"
    prompts["prefix"].save(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError):
        GeneratedPrompt.load(path)


def test_load_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ValueError):
        GeneratedPrompt.load(path)


def test_load_safetensors_without_metadata(tmp_path, prompts):
    path = tmp_path / "plain.safetensors"
    save_file({"token_ids": prompts["discrete"].token_ids}, str(path))
    with pytest.raises(ValueError, match="peft-metal"):
        GeneratedPrompt.load(path)
    save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="peft-metal"):
        GeneratedPrompt.load(path)


def test_load_damaged_metadata(tmp_path, prompts):
    path = tmp_path / "bad.safetensors"
    prompt = prompts["discrete"]
    metadata = {"format": "peft-metal-prompt", "format_version": "1", "design": "discrete", "num_tokens": str(K)}
    save_file({"token_ids": prompt.token_ids, "demonstrations": prompt.demonstrations}, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="metadata"):
        GeneratedPrompt.load(path)
    metadata.update(base_fingerprint="{", pgm_config="{}", text="null", demonstrations_text='""')
    save_file({"token_ids": prompt.token_ids, "demonstrations": prompt.demonstrations}, str(path), metadata=metadata)
    with pytest.raises(ValueError):
        GeneratedPrompt.load(path)


def test_load_other_format_version(tmp_path, prompts):
    path = tmp_path / "p.safetensors"
    prompts["discrete"].save(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    metadata["format_version"] = "99"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="version"):
        GeneratedPrompt.load(path)


def test_load_wrong_shapes(tmp_path, prompts):
    """A file whose payload does not hold K positions is refused."""
    path = tmp_path / "p.safetensors"
    prompts["discrete"].save(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["token_ids"] = tensors["token_ids"][:-1]
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="damaged: its contents no longer match"):
        GeneratedPrompt.load(path)
    metadata.pop("sha256")  # a file without a checksum (written before them, or crafted) is still checked
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="positions"):
        GeneratedPrompt.load(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        GeneratedPrompt.load(tmp_path / "nope.safetensors")


def test_metadata_is_json(prompts, tmp_path):
    path = tmp_path / "p.safetensors"
    prompts["weighted_sum"].save(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "peft-metal-prompt"
    assert json.loads(metadata["base_fingerprint"]) == prompts["weighted_sum"].base_fingerprint


# ------------------------------------------------------------------------------------------ foreign base models


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("other", ["qwen2", "llama-seed1"])
def test_prompt_on_another_base_model(design, other, prompts, tok):
    prompt = prompts[design]
    family, seed = ("llama", 1) if other == "llama-seed1" else (other, 0)
    model = make_pgm(family, design, seed=seed)
    own = model.base_model.base_fingerprint()
    query = encode(tok, QUERIES[0]).unsqueeze(0)
    for call in (
        lambda: model(prompt=prompt, input_ids=query),
        lambda: model.generate(prompt=prompt, input_ids=query, max_new_tokens=2),
    ):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert prompt.base_fingerprint["embedding_sha256"] in message
        assert own["embedding_sha256"] in message
        assert prompt.base_fingerprint["embedding_sha256"] != own["embedding_sha256"]
        assert prompt.base_fingerprint["architecture"] in message and own["architecture"] in message


@pytest.mark.parametrize("family", FAMILIES)
def test_fingerprint_is_stable_across_dtype_and_copies(family):
    a = make_pgm(family, "prefix").base_model.base_fingerprint()
    b = make_pgm(family, "prefix").base_model.base_fingerprint()
    assert a == b
    lm = make_lm(family).to(torch.bfloat16)
    c = make_pgm(family, "prefix", lm=lm).base_model.base_fingerprint()
    assert c == a


@pytest.mark.parametrize("design", ["discrete", "weighted_sum", "hidden_state"])
def test_past_key_values_only_for_prefix(design, prompts):
    with pytest.raises(ValueError, match="prefix"):
        prompts[design].past_key_values


def test_constructor_validates_payload(prompts):
    p = prompts["prefix"]
    common = dict(base_fingerprint=p.base_fingerprint, pgm_config=p.pgm_config)
    with pytest.raises(ValueError, match="keys"):
        GeneratedPrompt(design="prefix", num_tokens=K, **common)
    with pytest.raises(ValueError, match="design"):
        GeneratedPrompt(design="soft", num_tokens=K, embeds=torch.zeros(K, 4), **common)
    with pytest.raises(ValueError):
        GeneratedPrompt(design="hidden_state", num_tokens=K, embeds=torch.zeros(K + 1, 4), **common)
    with pytest.raises(ValueError, match="demonstrations"):
        GeneratedPrompt(
            design="discrete", num_tokens=K, token_ids=torch.zeros(K, dtype=torch.long),
            demonstrations=torch.zeros(1, 3, dtype=torch.long), **common,
        )
