"""Property tests (hypothesis) for the prompt store as it lies on disk: prompt files and index rows damaged in every
way. Whatever the damage, the store serves the prompt it stored or refuses it with a clear error (PromptNotFoundError,
DamagedPromptError: 404 and 409 over HTTP); listing leaves damaged rows out, `verify` reports them, and the store still
opens. Never another exception, and never a different prompt."""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import SHOTS, build_tokenizer, make_pgm
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_property_inputs import same_prompt

from peft_metal.serving.store import DamagedPromptError, PromptNotFoundError, PromptStore

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
COLUMNS = ("prompt_id", "task", "content_hash", "design", "num_tokens", "num_demonstrations", "base_fingerprint",
           "created_at", "hits", "sha256", "size")
CLEAR_ERRORS = (PromptNotFoundError, DamagedPromptError)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A store holding two prompts (discrete and prefix), copied fresh for each example; and the prompts."""
    root = tmp_path_factory.mktemp("store")
    tok = build_tokenizer()
    prompts = {}
    with PromptStore(root) as store:
        for design in ("discrete", "prefix"):
            with torch.no_grad():
                prompt = make_pgm("llama", design).generate_prompt(SHOTS, tokenizer=tok)
            prompt_id = store.put(design, SHOTS, 0, prompt.base_fingerprint, {"prompt_design": design}, prompt)
            prompts[prompt_id] = prompt
    files = {path.relative_to(root): path.read_bytes() for path in root.rglob("*") if path.is_file()}
    return files, prompts


def copy_of(stored, folder: Path) -> Path:
    files, _ = stored
    for relative, data in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
    return folder


def check_store(root: Path, prompts) -> None:
    """Every read the service makes: each prompt the same or clearly refused; listing and verifying never fail."""
    try:
        store = PromptStore(root)
    except ValueError as error:
        assert str(error)
        return
    with store:
        for prompt_id, original in prompts.items():
            try:
                loaded = store.get(prompt_id)
            except CLEAR_ERRORS as error:
                assert str(error)
            else:
                assert same_prompt(loaded, original), "a damaged store served a different prompt"
            try:
                store.info(prompt_id)
            except CLEAR_ERRORS as error:
                assert str(error)
        assert {row["prompt_id"] for row in store.list()} <= set(prompts)
        report = store.verify()
        assert set(report["ok"]) <= set(prompts)
        assert all(same_prompt(store.get(prompt_id), prompts[prompt_id]) for prompt_id in report["ok"])


file_damage = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16)),
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 7)),
    st.tuples(st.just("replace"), st.binary(max_size=256)),
    st.tuples(st.just("delete")),
    st.tuples(st.just("swap")),  # the other prompt's file under this prompt's name
)


@SETTINGS
@given(which=st.integers(0, 1), damage=file_damage)
def test_damaged_prompt_files_are_refused(stored, which, damage):
    _, prompts = stored
    with tempfile.TemporaryDirectory() as folder:
        root = copy_of(stored, Path(folder))
        ids = list(prompts)
        path = root / "prompts" / f"{ids[which]}.safetensors"
        data = path.read_bytes()
        kind = damage[0]
        if kind == "truncate":
            path.write_bytes(data[: damage[1] % len(data)])
        elif kind == "flip":
            position = damage[1] % len(data)
            path.write_bytes(data[:position] + bytes([data[position] ^ (1 << damage[2])]) + data[position + 1 :])
        elif kind == "replace":
            path.write_bytes(damage[1])
        elif kind == "delete":
            path.unlink()
        else:
            path.write_bytes((root / "prompts" / f"{ids[1 - which]}.safetensors").read_bytes())
        check_store(root, prompts)
        with PromptStore(root) as store:
            assert ids[which] in store.verify()["damaged"]


sql_values = st.one_of(
    st.none(), st.integers(-(1 << 63), (1 << 63) - 1), st.floats(allow_nan=False), st.text(max_size=80),
    st.binary(max_size=40), st.sampled_from(["{}", "[]", "null", '{"model_type": "gpt2"}', "0" * 64]),
)


@SETTINGS
@given(which=st.integers(0, 1), column=st.sampled_from(COLUMNS), value=sql_values)
def test_edited_index_rows_are_served_unchanged_or_refused(stored, which, column, value):
    _, prompts = stored
    with tempfile.TemporaryDirectory() as folder:
        root = copy_of(stored, Path(folder))
        prompt_id = list(prompts)[which]
        with sqlite3.connect(root / "index.sqlite") as db:
            try:
                db.execute(f"UPDATE prompts SET {column} = ? WHERE prompt_id = ?", (value, prompt_id))
            except sqlite3.IntegrityError:
                assume(False)  # NOT NULL or a duplicate id: SQLite itself keeps such a row from existing
        db.close()
        check_store(root, prompts)


@SETTINGS
@given(which=st.integers(0, 1))
def test_deleted_index_rows_leave_the_file_unserved(stored, which):
    _, prompts = stored
    with tempfile.TemporaryDirectory() as folder:
        root = copy_of(stored, Path(folder))
        prompt_id = list(prompts)[which]
        with sqlite3.connect(root / "index.sqlite") as db:
            db.execute("DELETE FROM prompts WHERE prompt_id = ?", (prompt_id,))
        db.close()
        with PromptStore(root) as store:
            with pytest.raises(PromptNotFoundError):
                store.get(prompt_id)
            assert not (root / "prompts" / f"{prompt_id}.safetensors").exists()  # an orphan, swept on open
