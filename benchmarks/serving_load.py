"""Load test of the HTTP service: a stored MetaL-Prompt against in-context learning (ICL-16) and zero-shot, and
batched against unbatched serving.

    python benchmarks/serving_load.py [--model smollm2-135m|tiny] [--pgm DIR] [--task NAME] [--task-dir DIR]
                                      [--clients 16] [--requests 24] [--max-seconds 60] [--refine-steps N]
                                      [--output DIR]

Starts the real server in a subprocess on 127.0.0.1 (an ephemeral port; `peft-metal serve` for a real model, a tiny
random PGM with a character tokenizer for `--model tiny`, a fast dry run), stores one prompt made from 16 shots of a
dev BIG-bench task, then runs C concurrent clients (asyncio + httpx, loopback only, bounded by count and time) for

* `metal`: completions after the stored prompt (`model: metal:<prompt_id>`);
* `icl`: the same inputs with all 16 shots sent along in every request (the base model + `shots`), the same
  service path with the shots re-read each time;
* `zero_shot`: the same inputs, plain LM (the base model),

and reports throughput and p50/p99 latency of each, first with batching (`--batch-window-ms`, `--max-batch`), then
with a server restarted unbatched (`--batch-window-ms 0 --max-batch 1`) at 16 clients. Multiple-choice tasks are
scored by options (one forward per batch), others generated greedily (`--max-new-tokens`). `--task-dir` takes the
task from a folder of BIG-bench-format tasks (e.g. `--task-dir /work/shared/tasks/dev --task bbq/age`) instead of
BIG-bench's own files.

With `--refine-steps N` the first server also measures mixed load: `metal` completions from C clients with nothing
else running, then the same completions while a refinement job of N steps (`refine_steps`, answered 202) runs on the
same shots, until it is ready; the target is a p95 during refinement of at most twice the p95 without it plus one
refinement step's time (the model thread serves waiting completions between steps).

Writes `serving_load.json` and `serving_load.md` into DIR (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import httpx
from report import machine_description, write_report  # benchmarks/report.py: what every benchmark leaves

DEFAULT_TASK = "similarities_abstraction"
HOST = "127.0.0.1"  # loopback only
COMPARE_CLIENTS = 16


# ---------------------------------------------------------------------------------------------------- the server


def _tiny_server(args: argparse.Namespace) -> None:
    """Child process for `--model tiny`: a random 2-layer Llama PGM with a one-char-per-token tokenizer."""
    import torch
    import uvicorn
    from peft import get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import peft_metal  # noqa: F401
    from peft_metal import MetaLPromptConfig
    from peft_metal.serving.app import create_app
    from peft_metal.serving.store import PromptStore

    vocab = {chr(i): i for i in range(32, 127)}
    vocab.update({"\n": 127, "<unk>": 0, "<pad>": 1})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8192, pad_token_id=1, bos_token_id=2, eos_token_id=3,
    )
    lm = LlamaForCausalLM(config).eval()
    model = get_peft_model(lm, MetaLPromptConfig(task_type="CAUSAL_LM", r=4)).eval()
    app = create_app(
        model, tokenizer, PromptStore(args.store), batch_window_ms=args.batch_window_ms, max_batch=args.max_batch,
        model_name="tiny", api_key=os.environ.get("PEFT_METAL_API_KEY"),  # as `peft-metal serve` reads it
    )
    uvicorn.run(app, host=HOST, port=args.port, log_level="warning")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Server:
    """The service in a subprocess; `stop()` terminates it, `kill()` SIGKILLs it (only this process, by its handle)."""

    def __init__(self, args: argparse.Namespace, store: Path, window_ms: float, max_batch: int, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://{HOST}:{self.port}"
        common = ["--store", str(store), "--port", str(self.port), "--batch-window-ms", str(window_ms), "--max-batch", str(max_batch)]
        if args.model == "tiny":
            command = [sys.executable, __file__, "--child-tiny-server", *common]
        else:
            command = [sys.executable, "-m", "peft_metal.cli", "serve", "--model", args.model, "--host", HOST, "--log-level", "warning", *common]
            if args.pgm:
                command += ["--pgm", args.pgm]
        self.log = log
        self._log_file = log.open("ab")
        self.process = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"The server exited with {self.process.returncode}; see {self.log}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"The server did not answer /healthz within {timeout:.0f} s; see {self.log}.")

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown handlers run."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log_file.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()


# ------------------------------------------------------------------------------------------------------- the load


def _percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100.0 * len(ordered) + 0.5)))  # nearest rank
    return ordered[rank - 1]


def _batch_stats(metrics: str) -> dict[str, float]:
    """Sum and count of the batch-size histogram (all kinds) from /metrics."""
    stats = {"sum": 0.0, "count": 0.0}
    for line in metrics.splitlines():
        match = re.match(r"^peft_metal_batch_size_(sum|count)\{[^}]*\} (\S+)$", line)
        if match:
            stats[match.group(1)] += float(match.group(2))
    return stats


async def run_load(
    url: str, bodies: list[dict[str, Any]], answers: list[tuple[str, ...]], clients: int, max_seconds: float,
    while_refining: Optional[str] = None,
) -> dict[str, Any]:
    """C clients take the next request until all are sent or time is up (or, with `while_refining`, that prompt's
    refinement has ended: only requests sent while it ran are timed); one warm-up request first (not timed)."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600.0, limits=limits) as client:
        warm = await client.post("/v1/completions", json=bodies[0])
        warm.raise_for_status()
        before = _batch_stats((await client.get("/metrics")).text)
        latencies: list[float] = []
        errors: dict[str, int] = {}
        correct = scored = 0
        position = 0
        start = time.perf_counter()
        deadline = start + max_seconds
        refining = while_refining is not None

        async def poll() -> None:
            nonlocal refining
            while refining and time.perf_counter() < deadline:
                status = (await client.get(f"/v1/prompts/{while_refining}")).json()
                refining = status.get("status") == "refining"
                await asyncio.sleep(0.25)

        async def worker() -> None:
            nonlocal position, correct, scored
            while position < len(bodies) and time.perf_counter() < deadline and (refining or while_refining is None):
                index = position
                position += 1
                sent = time.perf_counter()
                try:
                    response = await client.post("/v1/completions", json=bodies[index])
                except httpx.HTTPError as error:
                    errors[type(error).__name__] = errors.get(type(error).__name__, 0) + 1
                    continue
                if response.status_code != 200:
                    errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1
                    continue
                latencies.append(time.perf_counter() - sent)
                choice = response.json()["choices"][0]
                prediction = choice["text"]
                scored += 1
                correct += _normalize(prediction) in {_normalize(a) for a in answers[index]}

        await asyncio.gather(*(worker() for _ in range(clients)), *([poll()] if refining else []))
        wall = time.perf_counter() - start
        after = _batch_stats((await client.get("/metrics")).text)
    calls = after["count"] - before["count"]
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "wall_s": wall,
        "throughput_rps": len(latencies) / wall if wall > 0 else 0.0,
        "p50_ms": None if not latencies else 1000 * _percentile(latencies, 50),
        "p95_ms": None if not latencies else 1000 * _percentile(latencies, 95),
        "p99_ms": None if not latencies else 1000 * _percentile(latencies, 99),
        "mean_batch": (after["sum"] - before["sum"]) / calls if calls else None,
        "accuracy": correct / scored if scored else None,
    }


def _normalize(text: Optional[str]) -> str:
    return " ".join((text or "").lower().split())


# ------------------------------------------------------------------------------------------------------- the run


def _task_requests(args: argparse.Namespace) -> tuple[str, list[dict[str, str]], list[dict[str, Any]], list[tuple[str, ...]], str]:
    from peft_metal.data import load_bigbench_task, tasks_for_split

    if args.task_dir is None and args.task not in tasks_for_split("dev"):
        raise SystemExit(f"{args.task!r} is not a dev task; choose one of: {', '.join(tasks_for_split('dev'))}")
    task = load_bigbench_task(args.task, root=args.task_dir)
    examples = list(task.examples)
    random.Random(args.seed).shuffle(examples)
    shots = [{"input": e.input, "output": e.output} for e in examples[: args.shots]]
    pool = examples[args.shots :]
    queries = [pool[i % len(pool)] for i in range(args.requests)]
    mode = args.mode
    if mode == "auto":
        mode = "options" if all(e.options for e in queries) else "generate"
    bodies, answers = [], []
    for example in queries:
        body: dict[str, Any] = {"prompt": example.input, "template": True, "temperature": 0}
        if mode == "options":
            body["options"] = list(example.options)
        else:
            body["max_tokens"] = args.max_new_tokens
        bodies.append(body)
        answers.append(example.answers)
    return task.name, shots, bodies, answers, mode


def _scenario_bodies(
    name: str, bodies: list[dict[str, Any]], base: str, prompt_id: str, shots: list[dict[str, str]]
) -> list[dict[str, Any]]:
    if name == "metal":
        return [{**body, "model": f"metal:{prompt_id}"} for body in bodies]
    if name == "icl":
        return [{**body, "model": base, "shots": shots} for body in bodies]
    return [{**body, "model": base} for body in bodies]


def _create_prompt(url: str, task: str, shots: list[dict[str, str]]) -> dict[str, Any]:
    body = {"task": task, "shots": shots, "num_demonstrations": 0}
    timings = {}
    for label in ("first", "again"):
        start = time.perf_counter()
        response = httpx.post(f"{url}/v1/prompts", json=body, timeout=600.0)
        timings[label] = (response.status_code, time.perf_counter() - start, response.json())
        if response.status_code not in (200, 201):
            raise RuntimeError(f"POST /v1/prompts failed: {response.status_code} {response.text}")
    created = timings["again"][2]
    info = httpx.get(f"{url}/v1/prompts/{created['prompt_id']}", timeout=60.0).json()
    return {
        "prompt_id": created["prompt_id"],
        "design": created["design"],
        "num_tokens": created["num_tokens"],
        "first_status": timings["first"][0],
        "first_ms": 1000 * timings["first"][1],
        "again_status": timings["again"][0],
        "again_ms": 1000 * timings["again"][1],
        "hits": info.get("hits"),
    }


def _metric_total(metrics: str, name: str) -> float:
    """A metric's value summed over its labels, from /metrics."""
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$")
    return sum(float(match.group(2)) for line in metrics.splitlines() if (match := pattern.match(line)))


def _refinement_load(
    args: argparse.Namespace, url: str, task: str, shots: list[dict[str, str]], bodies: list[dict[str, Any]],
    answers: list[tuple[str, ...]], prompt_id: str,
) -> dict[str, Any]:
    """`metal` completions without refinement, then the same load while an `--refine-steps` job runs."""
    metal = _scenario_bodies("metal", bodies, "", prompt_id, shots)
    without = asyncio.run(run_load(url, metal, answers, args.clients, args.max_seconds))
    print(json.dumps({"refinement": "none", **without}), file=sys.stderr)
    cycles = 1000  # as many requests as the job lasts
    body = {"task": task, "shots": shots, "refine_steps": args.refine_steps}
    started = time.perf_counter()
    accepted = httpx.post(f"{url}/v1/prompts", json=body, timeout=600.0)
    post_ms = 1000 * (time.perf_counter() - started)
    if accepted.status_code != 202:
        raise RuntimeError(f"POST /v1/prompts with refine_steps answered {accepted.status_code}: {accepted.text}")
    job = accepted.json()
    during = asyncio.run(
        run_load(url, metal * cycles, answers * cycles, args.clients, args.max_seconds, while_refining=job["prompt_id"])
    )
    print(json.dumps({"refinement": args.refine_steps, **during}), file=sys.stderr)
    while (status := httpx.get(f"{url}/v1/prompts/{job['prompt_id']}", timeout=60.0).json())["status"] == "refining":
        time.sleep(0.5)
    job_s = time.perf_counter() - started
    metrics = httpx.get(f"{url}/metrics", timeout=60.0).text
    steps = _metric_total(metrics, "peft_metal_refine_step_duration_seconds_count")
    step_s = _metric_total(metrics, "peft_metal_refine_step_duration_seconds_sum") / steps if steps else None
    target_ms = None
    if without["p95_ms"] is not None and step_s is not None:
        target_ms = 2 * without["p95_ms"] + 1000 * step_s
    return {
        "refine_steps": args.refine_steps, "job_status": status["status"], "job_s": job_s, "steps_timed": steps,
        "step_s": step_s, "post_ms": post_ms,
        "without": without, "during": during, "target_p95_ms": target_ms,
        "met": None if target_ms is None or during["p95_ms"] is None else during["p95_ms"] <= target_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (or any model `peft-metal serve` takes), or tiny")
    parser.add_argument("--pgm", help="a saved PGM for the server (default: shipped or fresh, as `peft-metal serve`)")
    parser.add_argument("--task", default=DEFAULT_TASK, help=f"a dev BIG-bench task (default {DEFAULT_TASK})")
    parser.add_argument("--task-dir", help="a folder of BIG-bench-format tasks to take --task from, instead of BIG-bench")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients per scenario (default 16)")
    parser.add_argument("--requests", type=int, default=24, help="requests per scenario (default 24)")
    parser.add_argument(
        "--max-seconds", type=float, default=60.0, help="stop sending after this long per scenario (default 60)"
    )
    parser.add_argument("--mode", choices=("auto", "options", "generate"), default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="for generate mode (default 8)")
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--scenarios", default="metal,icl,zero_shot")
    parser.add_argument("--skip-unbatched", action="store_true", help="no unbatched comparison")
    parser.add_argument(
        "--refine-steps", type=int, default=0,
        help="also time metal completions during a refinement job of this many steps, on the first server (default 0: no)",
    )
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    # Internal: the tiny model's server process.
    parser.add_argument("--child-tiny-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_tiny_server:
        _tiny_server(args)
        return

    task_name, shots, bodies, answers, mode = _task_requests(args)
    scenarios = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = set(scenarios) - {"metal", "icl", "zero_shot"}
    if unknown:
        raise SystemExit(f"Unknown scenarios {sorted(unknown)}; choose from metal, icl, zero_shot.")
    started = time.perf_counter()
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None  # other work sharing the CPUs
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="peft-metal-serving-load-") as workdir:
        store, log = Path(workdir) / "store", Path(workdir) / "server.log"
        configs = [("batched", args.batch_window_ms, args.max_batch, args.clients)]
        if not args.skip_unbatched:
            configs.append(("unbatched", 0.0, 1, COMPARE_CLIENTS))
        if args.clients != COMPARE_CLIENTS and not args.skip_unbatched:
            configs.insert(1, ("batched", args.batch_window_ms, args.max_batch, COMPARE_CLIENTS))
        prompt, refinement = None, None
        for label, window_ms, max_batch, clients in configs:
            server = Server(args, store, window_ms, max_batch, log)
            try:
                load_start = time.perf_counter()
                server.wait_ready()
                print(f"[{label}] server up in {time.perf_counter() - load_start:.1f} s at {server.url}", file=sys.stderr)
                created = _create_prompt(server.url, task_name, shots)
                base = httpx.get(f"{server.url}/v1/models", timeout=60.0).json()["data"][0]["id"]
                if args.refine_steps and prompt is None:
                    refinement = _refinement_load(args, server.url, task_name, shots, bodies, answers, created["prompt_id"])
                prompt = prompt or created
                for name in scenarios:
                    result = asyncio.run(
                        run_load(server.url, _scenario_bodies(name, bodies, base, created["prompt_id"], shots), answers, clients, args.max_seconds)
                    )
                    row = {"scenario": name, "server": label, "batch_window_ms": window_ms, "max_batch": max_batch, **result}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
            finally:
                server.stop()
    total_s = time.perf_counter() - started

    machine = f"{machine_description()}, {os.cpu_count()} CPUs"
    settings = {
        "model": args.model, "pgm": args.pgm, "task": task_name, "task_dir": args.task_dir, "shots": args.shots,
        "mode": mode, "refine_steps": args.refine_steps,
        "clients": args.clients, "requests": args.requests, "max_seconds": args.max_seconds,
        "max_new_tokens": args.max_new_tokens if mode == "generate" else None,
        "batch_window_ms": args.batch_window_ms, "max_batch": args.max_batch, "seed": args.seed,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    report = {
        "settings": settings, "machine": machine, "load_average_at_start": load_at_start, "total_s": total_s,
        "prompt": prompt, "rows": rows, "refinement": refinement,
    }
    write_report(args.output, "serving_load", report, _markdown(report).splitlines())


def _fmt(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _markdown(report: dict[str, Any]) -> str:
    s, prompt = report["settings"], report["prompt"]
    command = f"python benchmarks/serving_load.py --model {s['model']}" + (f" --pgm {s['pgm']}" if s["pgm"] else "")
    command += f" --task {s['task']}" + (f" --task-dir {s['task_dir']}" if s.get("task_dir") else "")
    command += f" --clients {s['clients']} --requests {s['requests']}"
    command += f" --refine-steps {s['refine_steps']}" if s.get("refine_steps") else ""
    lines = [
        f"`{command}` on {report['machine']} (OMP_NUM_THREADS={s['omp_num_threads']}); {s['shots']} shots, "
        f"mode {s['mode']}, total {report['total_s']:.0f} s; load average at start "
        f"{_fmt(report['load_average_at_start'][0] if report['load_average_at_start'] else None, 2)} "
        "(other processes sharing the CPUs make these timings noisy).",
        "",
        f"Stored prompt: {prompt['design']}, {prompt['num_tokens']} tokens; made in {prompt['first_ms']:.0f} ms "
        f"(HTTP {prompt['first_status']}), found again in {prompt['again_ms']:.0f} ms (HTTP {prompt['again_status']}).",
        "",
        "| scenario | server | clients | requests | errors | throughput (req/s) | p50 (ms) | p99 (ms) | mean batch | accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        errors = sum(row["errors"].values())
        lines.append(
            f"| {row['scenario']} | {row['server']} (window {row['batch_window_ms']:g} ms, max {row['max_batch']}) | "
            f"{row['clients']} | {row['requests']} | {errors} | {_fmt(row['throughput_rps'], 2)} | {_fmt(row['p50_ms'], 0)} | "
            f"{_fmt(row['p99_ms'], 0)} | {_fmt(row['mean_batch'], 1)} | {_fmt(row['accuracy'], 2)} |"
        )
    batched = {r["scenario"]: r for r in report["rows"] if r["server"] == "batched" and r["clients"] == COMPARE_CLIENTS}
    unbatched = {r["scenario"]: r for r in report["rows"] if r["server"] == "unbatched"}
    speedups = [
        f"{name} {batched[name]['throughput_rps'] / unbatched[name]['throughput_rps']:.2f}x"
        for name in batched
        if name in unbatched and unbatched[name]["throughput_rps"]
    ]
    if speedups:
        lines += ["", f"Batched / unbatched throughput at {COMPARE_CLIENTS} clients: " + ", ".join(speedups) + "."]
    if report.get("refinement"):
        lines += ["", *_refinement_markdown(report["refinement"])]
    lines += [
        "",
        "Accuracy is over the requests answered, with an untrained PGM unless --pgm was given: it checks that answers "
        "come back, not the method.",
    ]
    return "\n".join(lines) + "\n"


def _refinement_markdown(refinement: dict[str, Any]) -> list[str]:
    steps = refinement["refine_steps"]
    lines = [
        f"Option-scored `metal` completions with nothing else running, and while a {steps}-step refinement job ran "
        f"(POST answered 202 in {refinement['post_ms']:.0f} ms; the job took {refinement['job_s']:.1f} s, "
        f"{_fmt(refinement['step_s'], 2)} s of model time a step, and ended {refinement['job_status']}):",
        "",
        "| load | clients | requests | errors | throughput (req/s) | p50 (ms) | p95 (ms) | p99 (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, row in (("no refinement", refinement["without"]), (f"during {steps}-step refinement", refinement["during"])):
        lines.append(
            f"| {label} | {row['clients']} | {row['requests']} | {sum(row['errors'].values())} | "
            f"{_fmt(row['throughput_rps'], 2)} | {_fmt(row['p50_ms'], 0)} | {_fmt(row['p95_ms'], 0)} | {_fmt(row['p99_ms'], 0)} |"
        )
    verdict = {True: "met", False: "missed", None: "not measured"}[refinement["met"]]
    lines += [
        "",
        f"Target: p95 during refinement at most 2 x p95 without it + one step = {_fmt(refinement['target_p95_ms'], 0)} "
        f"ms; {verdict}.",
    ]
    return lines


if __name__ == "__main__":
    main()
