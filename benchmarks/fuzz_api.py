"""The HTTP API fuzzed by schemathesis from its own OpenAPI document, against the real server and model.

    python benchmarks/fuzz_api.py [--model smollm2-135m] [--pgm peft_metal/shipped/smollm2-135m]
        [--max-examples 300] [--max-time 1500] [--seed 0]

Starts `peft-metal serve` (API key from $PEFT_METAL_API_KEY, as a deployment would), stores one prompt made from a
dev task's shots, then runs `st run` with every phase (examples, coverage, fuzzing, stateful), positive and negative
cases and every check, with the cross-field rules of tests/schemathesis_hooks.py (the hooks tests/test_fuzz_api.py
uses with a tiny model). Pass: no failure, and the server still answers /healthz and a completion afterwards. Writes
`fuzz_api.json` and `fuzz_api.md`: cases generated per phase and operation, failures, refusals explained by a
cross-field rule.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
from report import write_report  # benchmarks/report.py: the JSON + markdown every benchmark leaves
from serving_load import DEFAULT_TASK, Server

TESTS = Path(__file__).resolve().parent.parent / "tests"
API_KEY = "fuzz-benchmark-key"
SMOLLM2_VOCAB_SIZE = 49152  # SmolLM2's tokenizer: token ids at or above it are refused (a cross-field rule)


def store_prompt(url: str, task: str, headers: dict[str, str]) -> str:
    from peft_metal.data import load_bigbench_task

    shots = [[example.input, example.output] for example in load_bigbench_task(task).examples[:8]]
    response = httpx.post(f"{url}/v1/prompts", json={"task": task, "shots": shots}, headers=headers, timeout=600)
    response.raise_for_status()
    return response.json()["model"]


def responses_by_status(url: str) -> dict[str, dict[str, int]]:
    """The server's own count of the requests it answered (its /metrics), as {"POST /v1/completions": {"200": n}}."""
    counts: dict[str, dict[str, int]] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        match = re.match(r'peft_metal_http_requests_total\{route="([^"]*)",method="(\w+)",status="(\d+)"\} (\d+)', line)
        if match:
            route, method, status, count = match.groups()
            counts.setdefault(f"{method} {route}", {})[status] = int(float(count))
    return counts


def run_schemathesis(url: str, models: list[str], args: argparse.Namespace, report_dir: Path) -> dict[str, Any]:
    command = [
        str(Path(sys.executable).with_name("st")), "run", f"{url}/openapi.json",
        "--header", f"Authorization: Bearer {API_KEY}", "--checks", "all", "--mode", "all",
        "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", str(args.max_examples),
        "--max-time", str(args.max_time), "--request-timeout", str(args.request_timeout), "--seed", str(args.seed),
        # A bounded request may take minutes on this CPU (thousands of new tokens); latency is soak.py's to measure.
        "--max-response-time", str(args.request_timeout),
        "--workers", "1", "--report", "json", "--report-dir", str(report_dir),
    ]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
        "PEFT_METAL_FUZZ_MODELS": ",".join(models),
        "PEFT_METAL_FUZZ_VOCAB_SIZE": str(args.vocab_size),
    }
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    print(result.stdout[-8000:], result.stderr[-2000:], sep="\n")
    return {"exit_code": result.returncode, **json.loads(sorted(report_dir.glob("json-*.json"))[-1].read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (peft-metal serve) or tiny")
    parser.add_argument("--pgm", default="peft_metal/shipped/smollm2-135m")
    parser.add_argument("--task", default=DEFAULT_TASK, help="the dev task whose examples make the stored prompt")
    parser.add_argument("--max-examples", type=int, default=300, help="cases per operation and phase")
    parser.add_argument("--max-time", type=int, default=1500, help="seconds for the whole schemathesis run")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--vocab-size", type=int, default=SMOLLM2_VOCAB_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.batch_window_ms, args.max_batch = 5.0, 16

    os.environ["PEFT_METAL_API_KEY"] = API_KEY  # the server reads it from its environment
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with tempfile.TemporaryDirectory() as folder:
        server = Server(args, Path(folder) / "store", args.batch_window_ms, args.max_batch, Path(folder) / "server.log")
        try:
            server.wait_ready()
            base = httpx.get(f"{server.url}/v1/models", headers=headers).json()["data"][0]["id"]
            models = [base, store_prompt(server.url, args.task, headers)]
            run = run_schemathesis(server.url, models, args, Path(folder) / "report")
            answered = responses_by_status(server.url)
            run_openapi = httpx.get(f"{server.url}/openapi.json", timeout=30).json()["paths"]
            health = httpx.get(f"{server.url}/healthz", timeout=30).status_code
            after = httpx.post(
                f"{server.url}/v1/completions", json={"model": base, "prompt": "Hello", "max_tokens": 4},
                headers=headers, timeout=120,
            ).status_code
        finally:
            server.stop()

    machine = f"{platform.machine()}, torch CPU, 2 cores; server and schemathesis share the machine"
    report = {
        "command": "python benchmarks/fuzz_api.py " + " ".join(sys.argv[1:]), "machine": machine,
        "model": args.model, "pgm": args.pgm, "healthz_after": health, "completion_after": after,
        "responses_by_status": answered, "schemathesis": run,
    }
    cases, failures = run["test_cases"], run["failures"]
    phases = ", ".join(f"{name} {phase['status']}" for name, phase in run["phases"].items())
    lines = [
        f"Schemathesis {run['schemathesis_version']} against `peft-metal serve` ({args.model}, {machine}): "
        f"{cases['generated']} cases in {run['running_time']:.0f} s over {run['operations']['tested']} operations, "
        f"phases: {phases}.",
        "",
        f"Failures: {sum(f['count'] for f in failures)}"
        + "".join(f"; {f['code']} {f['title']} ({f['count']}: {', '.join(f['operations'])})" for f in failures)
        + f". Refusals of schema-valid requests explained by a cross-field rule (not failures): {run['filtered']}. "
        f"Afterwards: /healthz {health}, a completion {after}.",
        "",
        "Responses by status, as the server counted them (its /metrics):",
        "",
        "| route | " + " | ".join(statuses := sorted({status for row in answered.values() for status in row})) + " |",
        "|---|" + "---|" * len(statuses),
    ]
    documented = {f"{method.upper()} {path}" for path, item in run_openapi.items() for method in item}
    other: dict[str, int] = {}
    for route, row in sorted(answered.items(), key=lambda item: -sum(item[1].values())):
        if route in documented:
            lines.append(f"| {route} | " + " | ".join(str(row.get(status, "")) for status in statuses) + " |")
        else:
            other = {status: other.get(status, 0) + count for status, count in row.items()}
    lines.append("| other methods and paths | " + " | ".join(str(other.get(status, "")) for status in statuses) + " |")
    write_report(args.output, "fuzz_api", report, lines)
    if run["exit_code"] != 0 or health != 200 or after != 200:
        raise SystemExit("schemathesis found problems (see above)")


if __name__ == "__main__":
    main()
