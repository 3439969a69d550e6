"""The persistent prompt store: ids, round trips, damage detection, concurrent processes and crash safety."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import pytest
import torch
from conftest import DESIGNS, SHOTS, make_pgm

from peft_metal import GeneratedPrompt
from peft_metal.serving import DamagedPromptError, PromptNotFoundError, PromptStore, prompt_key

FAKE_BASE = {"architecture": "FakeForCausalLM", "embedding_sha256": "0123456789abcdef"}
FAKE_CONFIG = {"prompt_design": "discrete", "num_prompt_tokens": 4}


def fake_prompt(seed: int, design: str = "discrete", width: int = 8) -> GeneratedPrompt:
    """A valid prompt without a model (the store does not care how it was made); same seed, same bytes."""
    generator = torch.Generator().manual_seed(seed)
    payload = (
        {"token_ids": torch.randint(0, 128, (4,), generator=generator)}
        if design == "discrete"
        else {"embeds": torch.randn(4, width, generator=generator)}
    )
    return GeneratedPrompt(
        design=design,
        num_tokens=4,
        base_fingerprint=dict(FAKE_BASE),
        pgm_config={**FAKE_CONFIG, "prompt_design": design},
        demonstrations=torch.arange(3),
        **payload,
    )


def assert_same_prompt(a: GeneratedPrompt, b: GeneratedPrompt) -> None:
    for name in ("token_ids", "embeds", "keys", "values", "demonstrations"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x.detach(), y), name
    for name in ("design", "num_tokens", "base_fingerprint", "pgm_config", "text", "demonstrations_text"):
        assert getattr(a, name) == getattr(b, name), name


def put_fake(store: PromptStore, seed: int, task: str = "task") -> str:
    prompt = fake_prompt(seed)
    return store.put(task, [(f"in {seed}", "out")], 0, FAKE_BASE, prompt.pgm_config, prompt)


@pytest.fixture(scope="module")
def made(tok):
    """One prompt per design from a tiny Llama PGM, with the key inputs a server would use."""
    out = {}
    for design in DESIGNS:
        model = make_pgm("llama", design)
        with torch.no_grad():
            prompt = model.generate_prompt(SHOTS, tokenizer=tok, num_demonstrations=1)
        out[design] = (model, prompt)
    return out


# ------------------------------------------------------------------------------------------------------------ ids


def test_prompt_key_is_a_content_hash():
    key = prompt_key("sentiment", SHOTS, 1, FAKE_BASE, FAKE_CONFIG)
    assert len(key) == 32 and int(key, 16) >= 0
    # The same shots, however they are spelled, and dict key order do not matter.
    as_lists = [list(shot) for shot in SHOTS]
    as_dicts = [{"input": x, "output": y} for x, y in SHOTS]
    reordered = dict(reversed(list(FAKE_CONFIG.items())))
    for shots, config in ((as_lists, FAKE_CONFIG), (as_dicts, FAKE_CONFIG), (SHOTS, reordered)):
        assert prompt_key("sentiment", shots, 1, FAKE_BASE, config) == key
    # Sets (as in a raw MetaLPromptConfig.to_dict()) hash like their sorted lists.
    assert prompt_key("t", SHOTS, 0, FAKE_BASE, {"m": {"b", "a"}}) == prompt_key("t", SHOTS, 0, FAKE_BASE, {"m": ["a", "b"]})


def test_everything_that_changes_the_prompt_changes_the_id():
    base = prompt_key("sentiment", SHOTS, 1, FAKE_BASE, FAKE_CONFIG)
    variants = [
        prompt_key("other task", SHOTS, 1, FAKE_BASE, FAKE_CONFIG),
        prompt_key("sentiment", SHOTS[::-1], 1, FAKE_BASE, FAKE_CONFIG),
        prompt_key("sentiment", SHOTS[:2], 1, FAKE_BASE, FAKE_CONFIG),
        prompt_key("sentiment", SHOTS, 0, FAKE_BASE, FAKE_CONFIG),
        prompt_key("sentiment", SHOTS, 2, FAKE_BASE, FAKE_CONFIG),
        prompt_key("sentiment", SHOTS, 1, {**FAKE_BASE, "embedding_sha256": "fedcba9876543210"}, FAKE_CONFIG),
        prompt_key("sentiment", SHOTS, 1, FAKE_BASE, {**FAKE_CONFIG, "prompt_design": "prefix"}),
        prompt_key("sentiment", SHOTS, 1, FAKE_BASE, {**FAKE_CONFIG, "pgm_weights": "abc"}),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_prompt_key_rejects_bad_inputs():
    with pytest.raises(ValueError, match="num_demonstrations"):
        prompt_key("t", SHOTS, 3, FAKE_BASE, FAKE_CONFIG)  # no shot left for the PGM
    with pytest.raises(TypeError, match="num_demonstrations"):
        prompt_key("t", SHOTS, True, FAKE_BASE, FAKE_CONFIG)
    with pytest.raises(TypeError, match="JSON"):
        prompt_key("t", SHOTS, 0, FAKE_BASE, {"x": object()})
    with pytest.raises(TypeError):
        prompt_key("t", "not shots", 0, FAKE_BASE, FAKE_CONFIG)


# ------------------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("design", DESIGNS)
def test_round_trip_and_reuse(design, made, tok, tmp_path):
    model, expected = made[design]
    fingerprint, config = expected.base_fingerprint, expected.pgm_config
    calls = []

    def make() -> GeneratedPrompt:
        calls.append(1)
        with torch.no_grad():
            return model.generate_prompt(SHOTS, tokenizer=tok, num_demonstrations=1)

    store = PromptStore(tmp_path / "store")
    prompt_id, prompt, cached = store.get_or_create("sentiment", SHOTS, 1, fingerprint, config, make)
    assert not cached and len(calls) == 1
    assert prompt_id == prompt_key("sentiment", SHOTS, 1, fingerprint, config)
    assert_same_prompt(prompt, expected)

    info = store.info(prompt_id)
    path = tmp_path / "store" / "prompts" / f"{prompt_id}.safetensors"
    assert info["content_hash"] == prompt_id and info["task"] == "sentiment" and info["design"] == design
    assert info["num_tokens"] == expected.num_tokens and info["num_demonstrations"] == 1
    assert info["base_fingerprint"] == fingerprint and info["hits"] == 0 and info["size"] == path.stat().st_size

    # Same shots again, from a fresh store object on the same folder (persistence): reused, make not called.
    store.close()
    store = PromptStore(tmp_path / "store")
    again_id, again, cached = store.get_or_create("sentiment", SHOTS, 1, fingerprint, config, make)
    assert (again_id, cached, len(calls)) == (prompt_id, True, 1)
    assert_same_prompt(again, expected)
    assert store.info(prompt_id)["hits"] == 1
    assert_same_prompt(store.get(prompt_id), expected)
    assert store.info(prompt_id)["hits"] == 2

    # Another split is another prompt.
    other_id, _, cached = store.get_or_create("sentiment", SHOTS, 0, fingerprint, config, lambda: fake_for(expected))
    assert other_id != prompt_id and not cached
    assert [row["prompt_id"] for row in store.list("sentiment")] == [prompt_id, other_id]
    assert store.list("another task") == []
    report = store.verify()
    assert sorted(report["ok"]) == sorted([prompt_id, other_id]) and not report["damaged"] and not report["orphans"]


def fake_for(prompt: GeneratedPrompt) -> GeneratedPrompt:
    """Another prompt of the same design and base (as a different split would give)."""
    payload = {n: getattr(prompt, n) + 1 for n in ("token_ids", "embeds", "keys", "values") if getattr(prompt, n) is not None}
    return replace(prompt, **payload)


def test_put_refuses_a_prompt_under_a_foreign_key(tmp_path):
    store = PromptStore(tmp_path)
    prompt = fake_prompt(0)
    with pytest.raises(ValueError, match="another base model"):
        store.put("t", SHOTS, 0, {**FAKE_BASE, "embedding_sha256": "x"}, prompt.pgm_config, prompt)
    with pytest.raises(ValueError, match="prompt_design"):
        store.put("t", SHOTS, 0, FAKE_BASE, {**prompt.pgm_config, "prompt_design": "prefix"}, prompt)
    with pytest.raises(TypeError, match="GeneratedPrompt"):
        store.get_or_create("t", SHOTS, 0, FAKE_BASE, prompt.pgm_config, lambda: "not a prompt")
    assert len(store) == 0 and os.listdir(tmp_path / "prompts") == []


# ---------------------------------------------------------------------------------------------- errors and damage


def test_unknown_ids(tmp_path):
    store = PromptStore(tmp_path)
    for bad in ("0" * 32, "../index", "", "A" * 32):
        with pytest.raises(PromptNotFoundError) as error:
            store.get(bad)
        assert isinstance(error.value, KeyError)
        assert bad in str(error.value) or bad == ""
        with pytest.raises(KeyError):
            store.info(bad)
        assert bad not in store and store.delete(bad) is False
    assert 12345 not in store


def test_delete(tmp_path):
    store = PromptStore(tmp_path)
    keep, drop = put_fake(store, 1), put_fake(store, 2)
    assert store.delete(drop) is True and drop not in store and keep in store
    assert store.delete(drop) is False
    with pytest.raises(PromptNotFoundError):
        store.get(drop)
    assert sorted(os.listdir(tmp_path / "prompts")) == [f"{keep}.safetensors"]
    assert store.verify()["ok"] == [keep]
    # Deleted prompts can be stored again.
    assert put_fake(store, 2) == drop and drop in store


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "garbage"])
def test_damaged_file_is_never_served(damage, tmp_path):
    store = PromptStore(tmp_path)
    good, bad = put_fake(store, 1), put_fake(store, 2)
    path = tmp_path / "prompts" / f"{bad}.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-1] ^= 0x01  # one bit of the payload: still a well-formed safetensors file
        path.write_bytes(bytes(data))
        with pytest.raises(ValueError, match="damaged"):  # the file's own checksum tells, as does the index's hash
            GeneratedPrompt.load(path)
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-7]))
    elif damage == "missing":
        path.unlink()
    else:
        path.write_bytes(b"\x00" * len(data))
    with pytest.raises(DamagedPromptError, match=bad) as error:
        store.get(bad)
    assert isinstance(error.value, ValueError) and error.value.prompt_id == bad
    assert store.info(bad)["hits"] == 0
    report = store.verify()
    assert report["ok"] == [good] and list(report["damaged"]) == [bad]
    assert report["damaged"][bad] == error.value.reason

    # get_or_create makes it again and replaces the damaged file.
    calls = []
    prompt = fake_prompt(2)
    make = lambda: calls.append(1) or prompt  # noqa: E731
    prompt_id, served, cached = store.get_or_create("task", [("in 2", "out")], 0, FAKE_BASE, prompt.pgm_config, make)
    assert (prompt_id, cached, len(calls)) == (bad, False, 1)
    assert_same_prompt(store.get(bad), prompt)
    assert sorted(store.verify()["ok"]) == sorted([good, bad])


def test_open_refuses_a_file_that_is_not_a_store(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        PromptStore(tmp_path / "file")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "index.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ValueError, match="not a prompt store"):
        PromptStore(tmp_path / "s")


# ----------------------------------------------------------------------------------------------- crash leftovers


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_crashes_are_invisible_then_cleaned(tmp_path):
    """Each stage a writer or deleter can die at leaves files that are never served and are cleaned on open."""
    store = PromptStore(tmp_path)
    kept, interrupted_delete = put_fake(store, 1), put_fake(store, 2)
    prompts = tmp_path / "prompts"
    pid = dead_pid()
    # A writer died while writing its temporary file (half a file) ...
    half = (prompts / f"{kept}.safetensors").read_bytes()[:50]
    (prompts / f".tmp-{pid}-00ff.safetensors").write_bytes(half)
    # ... or after renaming it into place, before its row was committed.
    orphan = prompt_key("never committed", SHOTS, 0, FAKE_BASE, FAKE_CONFIG)
    fake_prompt(3).save(prompts / f"{orphan}.safetensors")
    # A deleter died after moving the file to the trash, before the row's deletion was committed ...
    (prompts / f"{interrupted_delete}.safetensors").rename(prompts / f".trash-{interrupted_delete}-{pid}-ab.safetensors")
    # ... or after COMMIT, before unlinking the trash.
    gone = prompt_key("deleted", SHOTS, 0, FAKE_BASE, FAKE_CONFIG)
    (prompts / f".trash-{gone}-{pid}-cd.safetensors").write_bytes(half)
    # A live writer's temporary file and a file the store did not name are left alone.
    (prompts / f".tmp-{os.getpid()}-11.safetensors").write_bytes(half)
    (prompts / "notes.txt").write_text("mine")
    store.close()

    store = PromptStore(tmp_path, cleanup_on_open=False)
    assert orphan not in store
    with pytest.raises(PromptNotFoundError):
        store.get(orphan)
    report = store.verify()
    assert report["ok"] == [kept] and list(report["damaged"]) == [interrupted_delete]
    assert sorted(report["orphans"]) == sorted(
        [f".tmp-{pid}-00ff.safetensors", f"{orphan}.safetensors", f".trash-{gone}-{pid}-cd.safetensors"]
    )
    assert report["interrupted"] == [f".trash-{interrupted_delete}-{pid}-ab.safetensors"]
    assert report["in_progress"] == [f".tmp-{os.getpid()}-11.safetensors"]
    assert report["unknown"] == ["notes.txt"]
    store.close()

    store = PromptStore(tmp_path)  # cleans on open
    report = store.verify()
    assert sorted(report["ok"]) == sorted([kept, interrupted_delete]) and not report["damaged"]
    assert not report["orphans"] and not report["interrupted"]
    assert sorted(os.listdir(prompts)) == sorted(
        [f"{kept}.safetensors", f"{interrupted_delete}.safetensors", f".tmp-{os.getpid()}-11.safetensors", "notes.txt"]
    )
    assert_same_prompt(store.get(interrupted_delete), fake_prompt(2))


def test_verify_repair(tmp_path):
    store = PromptStore(tmp_path)
    kept = put_fake(store, 1)
    (tmp_path / "prompts" / f".tmp-{dead_pid()}-0.safetensors").write_bytes(b"half")
    report = store.verify(repair=True)
    assert report["ok"] == [kept] and len(report["orphans"]) == 1 and report["removed"] == report["orphans"]
    assert os.listdir(tmp_path / "prompts") == [f"{kept}.safetensors"]


# ------------------------------------------------------------------------------------------------ several processes

WORKERS = 4
PROMPTS_PER_WORKER = 10


def concurrent_worker(root: str, worker: int, barrier, results) -> None:
    """Even i: shots shared by all workers (they race on one id); odd i: this worker's own. Reads in between."""
    try:
        torch.set_num_threads(1)
        store = PromptStore(root)
        barrier.wait(timeout=120)
        rng = random.Random(worker)
        out = {}
        for i in range(PROMPTS_PER_WORKER):
            shots = [(f"shared {i}", "out")] if i % 2 == 0 else [(f"worker {worker} item {i}", "out")]
            # Content differs per worker, so a lost race would show if a caller got other bytes than were stored.
            made = fake_prompt(1000 * worker + i)

            def make() -> GeneratedPrompt:
                time.sleep(rng.uniform(0, 0.02))  # widen the race window
                return made

            prompt_id, prompt, cached = store.get_or_create("task", shots, 0, FAKE_BASE, made.pgm_config, make)
            out[prompt_id] = (prompt.token_ids.tolist(), cached)
            others = store.list("task")
            store.get(rng.choice(others)["prompt_id"])
        results.put((worker, out, None))
    except BaseException as error:  # reported to the parent, which fails the test with it
        results.put((worker, {}, repr(error)))


def test_several_processes_share_one_store(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(WORKERS), context.Queue()
    processes = [
        context.Process(target=concurrent_worker, args=(str(tmp_path), w, barrier, results)) for w in range(WORKERS)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=300) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert [error for _, _, error in outcomes if error] == []

    store = PromptStore(tmp_path)
    shared = PROMPTS_PER_WORKER // 2
    expected_rows = shared + WORKERS * (PROMPTS_PER_WORKER - shared)
    report = store.verify()
    assert len(report["ok"]) == expected_rows == len(store) and not report["damaged"] and not report["orphans"]
    assert not report["in_progress"]
    made_by = {}
    for worker, out, _ in outcomes:
        for prompt_id, (token_ids, cached) in out.items():
            assert store.get(prompt_id).token_ids.tolist() == token_ids  # every caller got the stored bytes
            if not cached:
                made_by.setdefault(prompt_id, []).append(worker)
    assert len(made_by) == expected_rows and all(len(w) == 1 for w in made_by.values())  # stored exactly once each
    reads = sum(row["hits"] for row in store.list())
    assert reads >= WORKERS * PROMPTS_PER_WORKER


# ---------------------------------------------------------------------------------------------------------- crash

CRASH_WRITER = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from peft_metal import GeneratedPrompt
    from peft_metal.serving import PromptStore
    store = PromptStore(sys.argv[1])
    base = {"architecture": "FakeForCausalLM"}
    i = 0
    while True:
        generator = torch.Generator().manual_seed(i)
        prompt = GeneratedPrompt(design="weighted_sum", num_tokens=4, base_fingerprint=base, pgm_config={"i": i},
                                 embeds=torch.randn(4, 16384, generator=generator))  # 256 KiB: writes take a while
        prompt_id = store.put("crash", [(str(i), "out")], 0, base, prompt.pgm_config, prompt)
        print(i, prompt_id, flush=True)
        i += 1
    """
)


def test_sigkill_mid_write_loses_nothing_and_shows_nothing_half_written(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    writer = subprocess.Popen(
        [sys.executable, "-c", CRASH_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    committed = []
    try:
        for line in writer.stdout:
            committed.append(line.split())
            if len(committed) == 5:
                break
        assert len(committed) == 5, "the writer died before storing anything"
        time.sleep(random.uniform(0, 0.05))
        writer.send_signal(signal.SIGKILL)
        committed += [line.split() for line in writer.stdout]  # what it reported before dying
    finally:
        writer.kill()
        writer.wait()
    assert writer.returncode == -signal.SIGKILL

    store = PromptStore(tmp_path, cleanup_on_open=False)
    report = store.verify()
    assert not report["damaged"] and not report["in_progress"]
    stored = set(report["ok"])
    assert len(stored) == len(store)
    assert {prompt_id for _, prompt_id in committed} <= stored  # nothing committed is lost
    for i, prompt_id in committed:
        assert store.get(prompt_id).pgm_config == {"i": int(i)}
    store.close()
    report = PromptStore(tmp_path).verify()  # open cleans what the kill left
    assert set(report["ok"]) == stored and not report["orphans"]
    assert sorted(os.listdir(tmp_path / "prompts")) == sorted(f"{prompt_id}.safetensors" for prompt_id in stored)


def test_a_job_whose_server_died_is_failed_on_open_and_a_live_ones_is_not(tmp_path):
    """A refinement job's row outlives a SIGKILLed server: the next open marks it failed with the reason (its prompt
    was never stored), while a job of a live process (this one) keeps running."""
    store = PromptStore(tmp_path)
    dead, live = "a" * 32, "b" * 32
    store.begin_job(dead, "task", 20, "c" * 32)
    store.begin_job(live, "task", 20, "c" * 32)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    store._db.execute("UPDATE jobs SET owner_pid = ? WHERE prompt_id = ?", (int(finished.stdout), dead))  # as it died
    store.close()

    reopened = PromptStore(tmp_path)
    job = reopened.job(dead)
    assert job["status"] == "failed" and f"pid {int(finished.stdout)}" in job["reason"]
    assert "send the same request again" in job["reason"] and dead not in reopened
    assert reopened.job(live)["status"] == "refining"
    reopened.end_job(live)
    assert reopened.job(live) is None
