"""Property tests (hypothesis) for what the project reads: prompt files damaged in every way, foreign safetensors
files, shots of every odd shape (as values and over HTTP) and PGM configs and folders with edited fields. Each must end in a clear ValueError or TypeError
(or load unchanged), never another exception, a hang or a different prompt."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import DESIGNS, SHOTS, build_tokenizer, make_lm, make_pgm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save, save_file

from peft_metal import GeneratedPrompt, MetaLPromptConfig
from peft_metal.metal_prompt.template import normalize_shots
from peft_metal.pgm import attach_pgm

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    """The bytes of one saved prompt per design (with a demonstration), and the prompts themselves."""
    folder = tmp_path_factory.mktemp("prompts")
    tok = build_tokenizer()
    files = {}
    for design in DESIGNS:
        with torch.no_grad():
            prompt = make_pgm("llama", design).generate_prompt(SHOTS, tokenizer=tok, num_demonstrations=1)
        path = folder / f"{design}.safetensors"
        prompt.save(path)
        files[design] = (path.read_bytes(), prompt)
    return files


def load_bytes(tmp_path, data: bytes):
    path = tmp_path / "candidate.safetensors"
    path.write_bytes(data)
    return GeneratedPrompt.load(path)


def same_prompt(a: GeneratedPrompt, b: GeneratedPrompt) -> bool:
    tensors = ("token_ids", "embeds", "keys", "values", "demonstrations")
    same_tensors = all(
        (getattr(a, n) is None) == (getattr(b, n) is None) and (getattr(a, n) is None or torch.equal(getattr(a, n), getattr(b, n)))
        for n in tensors
    )
    return same_tensors and (a.design, a.num_tokens, a.text, a.demonstrations_text, a.pgm_config) == (
        b.design, b.num_tokens, b.text, b.demonstrations_text, b.pgm_config
    )


@SETTINGS
@given(design=st.sampled_from(DESIGNS), data=st.data())
def test_truncated_prompt_files_are_refused(prompt_files, tmp_path, design, data):
    original, _ = prompt_files[design]
    cut = data.draw(st.integers(0, len(original) - 1))
    with pytest.raises(ValueError):
        load_bytes(tmp_path, original[:cut])


@SETTINGS
@given(design=st.sampled_from(DESIGNS), data=st.data())
def test_bit_flips_are_refused_or_change_nothing(prompt_files, tmp_path, design, data):
    """Any flipped bits: refused (a broken header, or the file's checksum), or the very same prompt (a flip in
    padding whitespace of the JSON header) - never a different prompt."""
    original, prompt = prompt_files[design]
    damaged = bytearray(original)
    for position in data.draw(st.lists(st.integers(0, len(original) * 8 - 1), min_size=1, max_size=8, unique=True)):
        damaged[position // 8] ^= 1 << (position % 8)
    try:
        loaded = load_bytes(tmp_path, bytes(damaged))
    except ValueError:
        return
    assert same_prompt(loaded, prompt)


@SETTINGS
@given(design=st.sampled_from(DESIGNS), other=st.sampled_from(DESIGNS))
def test_a_header_from_another_prompt_is_refused(prompt_files, tmp_path, design, other):
    """The header (metadata, tensor table) of one prompt file on the data of another."""
    if design == other:
        return
    head_source, _ = prompt_files[other]
    data_source, _ = prompt_files[design]
    header_length = struct.unpack("<Q", head_source[:8])[0]
    data_start = 8 + struct.unpack("<Q", data_source[:8])[0]
    with pytest.raises(ValueError):
        load_bytes(tmp_path, head_source[: 8 + header_length] + data_source[data_start:])


tensor_names = st.sampled_from(["token_ids", "embeds", "keys", "values", "demonstrations", "weight", "x"])
tensors = st.dictionaries(
    tensor_names,
    st.tuples(st.sampled_from([torch.float32, torch.int64, torch.bfloat16]), st.lists(st.integers(0, 4), max_size=4)),
    min_size=1,
    max_size=4,
)
metadata = st.dictionaries(
    st.sampled_from(["format", "format_version", "design", "num_tokens", "base_fingerprint", "pgm_config", "text"]),
    st.one_of(st.text(max_size=20), st.sampled_from(["peft-metal-prompt", "1", "prefix", "discrete", "4", "{}"])),
    max_size=7,
)


@SETTINGS
@given(tensors=tensors, metadata=metadata)
def test_foreign_safetensors_files_are_refused(tmp_path, tensors, metadata):
    contents = {name: torch.zeros(shape, dtype=dtype) for name, (dtype, shape) in tensors.items()}
    with pytest.raises(ValueError):
        load_bytes(tmp_path, save(contents, metadata=metadata or None))


@SETTINGS
@given(garbage=st.binary(max_size=512))
def test_arbitrary_bytes_are_refused(tmp_path, garbage):
    with pytest.raises(ValueError):
        load_bytes(tmp_path, garbage)


json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30), st.binary(max_size=5)),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.tuples(children, children), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(shots=st.one_of(json_like, st.lists(st.tuples(st.text(), st.text()), max_size=5)))
def test_shots_of_any_shape_are_pairs_of_strings_or_a_clear_error(shots):
    try:
        normalized = normalize_shots(shots)
    except (ValueError, TypeError):
        return
    assert normalized and all(isinstance(x, str) and isinstance(y, str) for x, y in normalized)


OWN_FIELDS = ("prompt_design", "num_prompt_tokens", "lora_scope", "padding_reparameterization", "temperature",
              "input_prefix", "output_prefix", "shot_separator")


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(OWN_FIELDS), value=json_like)
def test_edited_pgm_configs_load_or_fail_clearly(field, value):
    """adapter_config.json with one MetaL-Prompt field edited to any JSON value: a valid config, or ValueError /
    TypeError naming the problem."""
    try:
        config = MetaLPromptConfig(task_type="CAUSAL_LM", **{field: value})
    except (ValueError, TypeError):
        return
    assert getattr(config, field) == value
    json.dumps(config.to_dict(), default=str)


def test_a_checksum_renamed_by_a_flip_does_not_pass_as_an_old_file(prompt_files, tmp_path):
    """Found by hypothesis (CI, draw [208, 1392]): one flip renamed "sha256" to "rha256", so the file read as one
    from before checksums, and a second flip in its metadata then loaded as a different prompt."""
    original, _ = prompt_files["discrete"]
    damaged = original.replace(b'"sha256"', b'"rha256"', 1)
    assert damaged != original
    with pytest.raises(ValueError, match="unexpected metadata"):
        load_bytes(tmp_path, damaged)


def test_a_saved_prompt_still_loads_as_itself(prompt_files, tmp_path):
    for original, prompt in prompt_files.values():
        assert same_prompt(load_bytes(tmp_path, original), prompt)


def test_prompt_saved_by_save_file_without_checksum_still_loads(prompt_files, tmp_path):
    """Files written before prompts carried a checksum load (and are checked field by field as before)."""
    from safetensors import safe_open

    path = tmp_path / "old.safetensors"
    path.write_bytes(prompt_files["prefix"][0])
    with safe_open(str(path), framework="pt") as reader:
        meta = {k: v for k, v in reader.metadata().items() if k != "sha256"}
        contents = {k: reader.get_tensor(k) for k in reader.keys()}
    save_file(contents, str(path), metadata=meta)
    assert same_prompt(GeneratedPrompt.load(path), prompt_files["prefix"][1])


@pytest.fixture(scope="module")
def pgm_folder(tmp_path_factory):
    """A saved tiny PGM (adapter_config.json + adapter_model.safetensors), copied for each example."""
    folder = tmp_path_factory.mktemp("pgm")
    make_pgm("llama", "hidden_state").save_pretrained(folder)
    return {path.name: path.read_bytes() for path in folder.iterdir()}


config_edits = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(OWN_FIELDS + ("peft_type", "r", "lora_alpha", "task_type")), json_like),
    st.tuples(st.just("drop"), st.sampled_from(OWN_FIELDS + ("peft_type", "r", "task_type"))),
    st.tuples(st.just("replace"), st.binary(max_size=64)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edit=config_edits)
def test_pgm_folders_with_edited_configs_load_or_fail_clearly(pgm_folder, tmp_path_factory, edit):
    """A PGM folder whose adapter_config.json was edited (a field set to any JSON value or removed, or the file
    overwritten) loads as a working PGM (`attach_pgm`: PEFT's `PeftModel.from_pretrained` after a check of the
    folder, as the CLI, the service and `init_from` load PGMs), or fails with a ValueError or TypeError naming the
    problem."""
    folder = tmp_path_factory.mktemp("edited")
    for name, data in pgm_folder.items():
        (folder / name).write_bytes(data)
    config_path = folder / "adapter_config.json"
    if edit[0] == "replace":
        config_path.write_bytes(edit[1])
    else:
        config = json.loads(config_path.read_text())
        if edit[0] == "set":
            config[edit[1]] = edit[2]
        else:
            config.pop(edit[1], None)
        config_path.write_text(json.dumps(config, default=repr))
    try:
        model = attach_pgm(make_lm("llama"), folder)
    except (ValueError, TypeError) as error:
        assert str(error)
        return
    with torch.no_grad():
        prompt = model.generate_prompt(SHOTS, tokenizer=build_tokenizer())
    assert prompt.num_tokens == model.peft_config["default"].num_prompt_tokens


odd_text = st.one_of(st.text(max_size=20), st.just(""), st.just("\u202e\u0000\U0001f600 é"), st.just("x" * 300_000))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), odd_text),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=12,
)
odd_shots = st.one_of(
    json_values,
    st.lists(st.one_of(st.tuples(odd_text, odd_text), st.fixed_dictionaries({"input": odd_text, "output": odd_text})),
             max_size=4),
)


@pytest.fixture(scope="module")
def prompt_service(tmp_path_factory):
    from fastapi.testclient import TestClient

    from peft_metal.serving.app import create_app
    from peft_metal.serving.store import PromptStore

    app = create_app(make_pgm("llama", "discrete"), build_tokenizer(), PromptStore(tmp_path_factory.mktemp("store")))
    with TestClient(app) as client:
        yield client


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shots=odd_shots, demonstrations=st.one_of(st.integers(-1, 5), st.none()))
def test_shots_of_any_shape_over_http_make_a_prompt_or_a_4xx(prompt_service, shots, demonstrations):
    """Shots of every odd shape sent to POST /v1/prompts (empty strings, control and right-to-left characters, 300 kB
    inputs, nested values): a stored prompt that reads back as made from them, or a 4xx naming the problem."""
    body = {"task": "odd", "shots": shots}
    if demonstrations is not None:
        body["num_demonstrations"] = demonstrations
    response = prompt_service.post("/v1/prompts", json=body)
    assert response.status_code in (200, 201, 413, 422), response.text
    if response.status_code >= 400:
        assert response.json()["error"]["message"]
        return
    stored = prompt_service.get(f"/v1/prompts/{response.json()['prompt_id']}")
    assert stored.status_code == 200 and stored.json()["task"] == "odd"
    assert stored.json()["num_demonstrations"] == (demonstrations or 0)
