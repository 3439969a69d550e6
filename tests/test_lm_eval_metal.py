"""lm-evaluation-harness with the `metal` model, offline, on local YAML tasks (tests/fixtures/lm_eval): the harness's
acc/acc_norm and generations equal the project's own scoring and decoding after the same prompt, computed here
independently from the task files."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tokenizer, make_lm, make_pgm

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before `datasets` is imported (through lm_eval), which reads them once
os.environ["HF_HUB_OFFLINE"] = "1"
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

import peft_metal.integrations.lm_eval  # noqa: E402,F401  (registers the `metal` model)
from peft_metal.evaluation.metrics import choice_hits, mean_stderr  # noqa: E402
from peft_metal.inference import (  # noqa: E402
    Sampling,
    eos_token_ids,
    generate,
    prompt_context,
    score_options,
)
from peft_metal.pgm import load_pgm  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "lm_eval"
SHOTS = 4
QUERY = "Input: {input}\nOutput:"  # the fixtures' doc_to_text


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to open a network connection fails the test (local sockets of the test process are not used)."""

    def refuse(self, address):
        raise AssertionError(f"network access attempted: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The tiny base LM and its tokenizer (with "~" as BOS, for empty request contexts), a PGM over it, and the task
    YAMLs pointing at the fixtures' JSONL."""
    root = tmp_path_factory.mktemp("lm_eval_metal")
    base, pgm, tasks = root / "base", root / "pgm", root / "tasks"
    make_lm("llama").save_pretrained(base)
    tok = build_tokenizer()
    tok.bos_token = "~"
    tok.save_pretrained(base)
    make_pgm("llama", "discrete").save_pretrained(pgm)
    tasks.mkdir()
    for yaml in FIXTURES.glob("*.yaml"):
        (tasks / yaml.name).write_text(yaml.read_text().replace("FIXTURES", str(FIXTURES)))
    return {"pretrained": str(base), "pgm": str(pgm), "include_path": str(tasks)}


def rows(split: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / f"{split}.jsonl").read_text().splitlines()]


def evaluate(folders, tasks, **kwargs):
    model_args = dict(folders, metal_shots=SHOTS, precision="fp32")
    return lm_eval.simple_evaluate(
        model="metal",
        model_args=model_args,
        tasks=tasks,
        task_manager=TaskManager(include_path=folders["include_path"], include_defaults=False),
        **kwargs,
    )


@pytest.fixture(scope="module")
def reference(folders):
    """(tuner, tokenizer, context): the LM after the prompt the PGM makes from the shots metal should draw (seed 0 over
    the training split, each as the query and `target(row)`), built with the project's functions."""
    model, tokenizer, _ = load_pgm(folders["pretrained"], folders["pgm"])
    tuner = model.base_model

    def read_prompt(target):
        chosen = random.Random(0).sample(rows("train"), SHOTS)
        shots = [(QUERY.format(**row), target(row)) for row in chosen]
        with torch.no_grad():
            prompt = tuner.generate_prompt(shots, tokenizer=tokenizer, chunk_size="auto")
        with tuner.lm_only(), torch.no_grad():
            return tuner, tokenizer, prompt_context(tuner.model, prompt)

    return read_prompt


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_multiple_choice_matches_the_projects_scoring(folders, reference):
    tuner, tokenizer, context = reference(lambda row: row["choices"][row["label"]])
    expected_sums, hits = [], {"acc": [], "acc_norm": []}
    with tuner.lm_only(), torch.no_grad():
        for row in rows("test"):
            query = encode(tokenizer, QUERY.format(**row))
            options = [encode(tokenizer, " " + c) for c in row["choices"]]
            scores = score_options(tuner.model, context, [query], [options])[0]
            sums = [s.sum_logprob for s in scores]
            expected_sums.append(sums)
            row_hits = choice_hits(
                row["choices"], [row["choices"][row["label"]]], sums, [s.mean_logprob for s in scores]
            )
            for name in hits:
                hits[name].append(row_hits[name])

    out = evaluate(folders, ["metal_toy_mc"], log_samples=True)
    result = out["results"]["metal_toy_mc"]
    for name, values in hits.items():
        mean, stderr = mean_stderr(values)
        assert result[f"{name},none"] == pytest.approx(mean)
        assert result[f"{name}_stderr,none"] == pytest.approx(stderr)
    samples = sorted(out["samples"]["metal_toy_mc"], key=lambda sample: sample["doc_id"])
    for sample, sums in zip(samples, expected_sums):
        assert [resp[0][0] for resp in sample["resps"]] == pytest.approx(sums, abs=1e-5)
    assert out["config"]["model_args"]["metal_shots"] == SHOTS
    assert out["config"]["pgm"] == folders["pgm"]


def test_generation_matches_the_projects_decoding(folders, reference):
    tuner, tokenizer, context = reference(lambda row: row["output"])
    expected = []
    with tuner.lm_only(), torch.no_grad():
        for row in rows("test"):
            query = encode(tokenizer, QUERY.format(**row))
            eos = eos_token_ids(tuner.model, tokenizer)
            tokens = generate(tuner.model, context, [query], [Sampling(5)], eos_token_ids=eos)[0].tokens
            expected.append(tokenizer.decode(tokens, skip_special_tokens=True).split("\n", 1)[0])

    out = evaluate(folders, ["metal_toy_gen"], log_samples=True)
    samples = sorted(out["samples"]["metal_toy_gen"], key=lambda sample: sample["doc_id"])
    assert [sample["resps"][0][0] for sample in samples] == expected
    assert "exact_match,none" in out["results"]["metal_toy_gen"]


def test_rolling_loglikelihood_is_the_text_after_the_prompt_and_bos(folders, reference):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    tuner, tokenizer, context = reference(lambda row: row["choices"][row["label"]])
    texts = ["Input: ab\nOutput: yes", "no way"]
    with tuner.lm_only(), torch.no_grad():
        bos = [tokenizer.bos_token_id]
        expected = [score_options(tuner.model, context, [bos], [[encode(tokenizer, t)]])[0][0].sum_logprob for t in texts]
    model = get_model("metal")(**folders, metal_shots=SHOTS, precision="fp32")
    requests = [
        Instance("loglikelihood_rolling", {}, (text,), index, metadata=("metal_toy_mc", index, 1))
        for index, text in enumerate(texts)
    ]
    assert model.loglikelihood_rolling(requests, disable_tqdm=True) == pytest.approx(expected, abs=1e-5)


def test_refine_steps_refine_each_tasks_prompt_once(folders):
    """refine_steps: each task's prompt is the PGM's, refined on the shots it read, and kept in `prompts`."""
    from peft_metal.integrations.lm_eval import MetalLM

    plain = MetalLM(**folders, metal_shots=SHOTS, precision="fp32")
    refined = MetalLM(**folders, metal_shots=SHOTS, precision="fp32", num_demonstrations=1, refine_steps=2, refine_lr=0.1)
    assert plain.prepared("metal_toy_mc").info is None and plain.prompts["metal_toy_mc"].refinement == []
    prepared = refined.prepared("metal_toy_mc")
    assert prepared.info == {"refine_steps": 2, "refine_lr": 0.1}
    assert refined.prompts["metal_toy_mc"].refinement == [
        {"steps": 2, "lr": 0.1, "batch_size": 8, "seed": 0, "num_shots": SHOTS - 1}
    ]
    assert refined.get_model_info()["refine_steps"] == 2 and refined.get_model_info()["refine_lr"] == 0.1
    with pytest.raises(ValueError, match="steps >= 0"):
        MetalLM(**folders, metal_shots=SHOTS, precision="fp32", refine_steps=-1)


def test_refuses_shots_from_the_evaluated_split(folders):
    with pytest.raises(ValueError, match="evaluated on"):
        evaluate(folders, ["metal_toy_leaky"])


def test_command_line(folders, tmp_path):
    """`python -m peft_metal.integrations.lm_eval` is lm-eval's CLI with `metal` registered."""
    model_args = ",".join(
        f"{key}={value}" for key, value in dict(folders, metal_shots=SHOTS, precision="fp32").items()
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    )
    command = [
        sys.executable,
        "-m",
        "peft_metal.integrations.lm_eval",
        "--model",
        "metal",
        "--model_args",
        model_args,
        "--tasks",
        "metal_toy_mc",
        "--include_path",
        folders["include_path"],
        "--output_path",
        str(tmp_path),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (written,) = tmp_path.rglob("results_*.json")
    result = json.loads(written.read_text())["results"]["metal_toy_mc"]
    assert {"acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"} <= set(result)
