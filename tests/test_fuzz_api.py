"""The HTTP API fuzzed from its own OpenAPI document by schemathesis, as CI can afford it (a tiny model, ~1 minute).

Every route and method, positive and negative cases (coverage and fuzzing phases) and stateful sequences (prompt
created, then read, completed with, cancelled or deleted: the OpenAPI links the app declares), with every check schemathesis has (no 5xx,
responses and status codes as documented, schema-invalid requests refused, schema-valid ones accepted unless a
cross-field rule in `schemathesis_hooks.py` explains the refusal, the API key enforced). The server must still answer
afterwards. `benchmarks/fuzz_api.py` runs the same against SmolLM2-135M for longer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import build_tokenizer, make_pgm, serve_on_loopback

from peft_metal.serving.app import create_app
from peft_metal.serving.store import PromptStore

pytest.importorskip("schemathesis")
pytest.importorskip("uvicorn")

API_KEY = "fuzz-key"
TESTS = Path(__file__).parent


def run_schemathesis(url: str, report_dir: Path, models: list[str], max_examples: int, seed: int) -> dict:
    """`st run` in a subprocess against the server at `url`; returns its JSON report (and fails with its output)."""
    st = Path(sys.executable).with_name("st")
    command = [
        str(st), "run", f"{url}/openapi.json", "--header", f"Authorization: Bearer {API_KEY}", "--checks", "all",
        "--mode", "all", "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", str(max_examples),
        "--seed", str(seed), "--workers", "1", "--report", "json", "--report-dir", str(report_dir),
    ]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
        "PEFT_METAL_FUZZ_MODELS": ",".join(models),
    }
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    reports = sorted(report_dir.glob("json-*.json"))
    assert result.returncode == 0 and reports, f"schemathesis found problems:\n{result.stdout[-6000:]}{result.stderr[-2000:]}"
    return json.loads(reports[-1].read_text())


def test_schemathesis_finds_nothing(tmp_path):
    model = make_pgm("llama", "discrete")
    app = create_app(model, build_tokenizer(), PromptStore(tmp_path / "store"), api_key=API_KEY, model_name="tiny-llama")
    with serve_on_loopback(app) as url:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        shots = [["good movie", "positive"], ["bad film", "negative"]]
        created = httpx.post(f"{url}/v1/prompts", json={"task": "sentiment", "shots": shots}, headers=headers)
        assert created.status_code == 201, created.text
        report = run_schemathesis(url, tmp_path / "report", ["tiny-llama", created.json()["model"]], 150, seed=0)
        assert httpx.get(f"{url}/healthz").status_code == 200
        completed = httpx.post(f"{url}/v1/completions", json={"model": "tiny-llama", "prompt": "ok"}, headers=headers)
        assert completed.status_code == 200, completed.text

    operations = report["operations"]
    assert operations["tested"] == operations["total"] >= 8 and operations["errored"] == 0
    assert all(report["phases"][phase]["status"] == "success" for phase in ("coverage", "fuzzing", "stateful"))
    assert report["test_cases"]["generated"] >= 500 and report["test_cases"]["with_failures"] == 0
    reached = report["valid_rates"]["POST /v1/completions"]["fuzzing"]["accepted"]
    assert reached > 0, "no completion reached the model: the fuzzing only tested refusals"
    cancels = report["valid_rates"]["POST /v1/prompts/{prompt_id}/cancel"]["fuzzing"]
    assert cancels["accepted"] + cancels["conflicts"] > 0, "no cancel reached a stored prompt or a job"
