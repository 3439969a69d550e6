"""Bounded soak test of the HTTP service: many loopback clients mixing every kind of request for a fixed number of
requests, with the server's resident memory watched from start to end.

    python benchmarks/soak.py [--model smollm2-135m|tiny] [--pgm DIR] [--clients 16] [--requests 2000]
                              [--max-seconds 900] [--output DIR]

Starts the real server (`peft-metal serve`, or serving_load.py's tiny random PGM for `--model tiny`, a dry run) on
127.0.0.1, then C clients draw requests from a seeded mix until `--requests` are done or `--max-seconds` pass:
prompt creation from shots of a dev task (some repeated, so the store's cache answers), completions generated and
scored by options, after a stored prompt and on the plain LM, prompt reads and deletes (a request for a prompt that a
concurrent client deleted gets 404, as it should). Reports throughput, p50/p99 latency per kind, errors (any 5xx, a connection failure or an
unexpected status; target 0) and the server's resident memory (VmRSS) after the first request, after each quarter of
the requests and at the end. The first quarter is the warm-up (the context cache fills, the allocator reaches its
working set); the target is the end within 10% of the figure after it. Writes `soak.json` and `soak.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from report import write_report  # benchmarks/report.py: the JSON + markdown every benchmark leaves
from serving_load import DEFAULT_TASK, Server, _percentile

KINDS = ("create", "complete_text", "complete_options", "plain_text", "plain_options", "read", "delete")
WEIGHTS = (1, 4, 4, 1, 1, 2, 1)


def resident_mb(pid: int) -> float:
    """VmRSS of a process, in MiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def task_examples(name: str) -> list[Any]:
    from peft_metal.data import load_bigbench_task

    return list(load_bigbench_task(name).examples)


class Mix:
    """The seeded stream of requests, and the prompt ids the clients have stored."""

    def __init__(self, examples: list[Any], seed: int) -> None:
        self.examples = examples
        self.rng = random.Random(seed)
        self.stored: list[str] = []
        self.base = ""  # the base model's name, read from GET /v1/models

    def shots(self) -> list[dict[str, str]]:
        size = self.rng.choice((4, 8, 16))
        start = self.rng.randrange(0, 3) * 16  # three shot sets per size: repeats hit the store's cache
        return [{"input": e.input, "output": e.output} for e in self.examples[start : start + size]]

    def query(self) -> Any:
        return self.examples[self.rng.randrange(48, len(self.examples))]

    def next(self) -> tuple[str, str, str, dict[str, Any] | None, tuple[int, ...]]:
        """(kind, method, path, body, expected statuses)."""
        kind = self.rng.choices(KINDS, WEIGHTS)[0]
        if kind != "create" and not self.stored:
            kind = "create"
        if kind == "create":
            return kind, "POST", "/v1/prompts", {"task": "soak", "shots": self.shots()}, (200, 201)
        # Under concurrency a request may reach a prompt just deleted, or one stored again since (the same shots give
        # the same id), so 200 and 404 are both right for it; anything else is an error.
        prompt_id = self.rng.choice(self.stored)
        if kind == "read":
            return kind, "GET", f"/v1/prompts/{prompt_id}", None, (200, 404)
        if kind == "delete":
            return kind, "DELETE", f"/v1/prompts/{prompt_id}", None, (204, 404)
        example = self.query()
        body: dict[str, Any] = {"prompt": example.input, "template": True, "temperature": 0}
        if kind.endswith("options") and example.options:
            body["options"] = list(example.options)
        else:
            body["max_tokens"] = 8
        if kind.startswith("plain"):
            return kind, "POST", "/v1/completions", {**body, "model": self.base}, (200,)
        return kind, "POST", "/v1/completions", {**body, "model": f"metal:{prompt_id}"}, (200, 404)


async def soak(url: str, pid: int, mix: Mix, clients: int, requests: int, max_seconds: float) -> dict[str, Any]:
    latencies: dict[str, list[float]] = {kind: [] for kind in KINDS}
    errors: dict[str, int] = {}
    memory: dict[str, float] = {}
    done = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600.0, limits=limits) as client:
        created = await client.post("/v1/prompts", json={"task": "soak", "shots": mix.shots()})  # warm-up
        created.raise_for_status()
        mix.stored.append(created.json()["prompt_id"])
        mix.base = (await client.get("/v1/models")).json()["data"][0]["id"]
        warm = {"model": f"metal:{mix.stored[0]}", "prompt": "warm-up", "max_tokens": 2, "template": True}
        (await client.post("/v1/completions", json=warm)).raise_for_status()
        memory["after_first_request"] = resident_mb(pid)
        start = time.perf_counter()
        deadline = start + max_seconds

        async def worker() -> None:
            nonlocal done
            while done < requests and time.perf_counter() < deadline:
                done += 1
                for quarter in (1, 2, 3):
                    if done == requests * quarter // 4:
                        memory[f"after_{25 * quarter}%"] = resident_mb(pid)
                kind, method, path, body, expected = mix.next()
                sent = time.perf_counter()
                try:
                    response = await client.request(method, path, json=body)
                except httpx.HTTPError as error:
                    errors[f"{kind}: {type(error).__name__}"] = errors.get(f"{kind}: {type(error).__name__}", 0) + 1
                    continue
                latencies[kind].append(time.perf_counter() - sent)
                if response.status_code not in expected:
                    key = f"{kind}: {response.status_code}"
                    errors[key] = errors.get(key, 0) + 1
                elif kind == "create":
                    mix.stored.append(response.json()["prompt_id"])

        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
        health = (await client.get("/healthz")).status_code
    memory["end"] = resident_mb(pid)
    total = sum(len(values) for values in latencies.values())
    return {
        "clients": clients,
        "requests": total,
        "wall_s": round(wall, 1),
        "throughput_rps": round(total / wall, 2) if wall else 0.0,
        "errors": errors,
        "healthz_after": health,
        "memory_mib": {key: round(value, 1) for key, value in memory.items()},
        "memory_growth": round(memory["end"] / memory["after_25%"] - 1, 4),
        "by_kind": {
            kind: {
                "requests": len(values),
                "p50_ms": round(1000 * _percentile(values, 50), 1) if values else None,
                "p99_ms": round(1000 * _percentile(values, 99), 1) if values else None,
            }
            for kind, values in latencies.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (peft-metal serve) or tiny")
    parser.add_argument("--pgm", default=None)
    parser.add_argument("--task", default=DEFAULT_TASK, help="the dev task whose examples make shots and inputs")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    examples = task_examples(args.task)
    with tempfile.TemporaryDirectory() as folder:
        server = Server(
            args, Path(folder) / "store", args.batch_window_ms, args.max_batch, Path(folder) / "server.log"
        )
        try:
            server.wait_ready()
            result = asyncio.run(
                soak(
                    server.url,
                    server.process.pid,
                    Mix(examples, args.seed),
                    args.clients,
                    args.requests,
                    args.max_seconds,
                )
            )
        finally:
            server.stop()
    machine = f"{platform.machine()}, torch CPU; server and clients share the machine"
    report = {
        "command": "python benchmarks/soak.py " + " ".join(sys.argv[1:]),
        "machine": machine,
        "model": args.model,
        "pgm": args.pgm,
        "task": args.task,
        **result,
    }
    lines = [
        f"Soak test ({args.model}, {result['clients']} loopback clients, {result['requests']} requests in "
        f"{result['wall_s']} s, {result['throughput_rps']} req/s; {machine}).",
        "",
        f"Errors: {sum(result['errors'].values())} {result['errors'] or ''}; /healthz after: {result['healthz_after']}.",
        f"Server memory (MiB): {result['memory_mib']}; end vs after the warm-up quarter: {100 * result['memory_growth']:+.1f}%.",
        "",
        "| kind | requests | p50 ms | p99 ms |",
        "|---|---|---|---|",
    ]
    for kind, stats in result["by_kind"].items():
        lines.append(f"| {kind} | {stats['requests']} | {stats['p50_ms']} | {stats['p99_ms']} |")
    write_report(args.output, "soak", report, lines)


if __name__ == "__main__":
    main()
