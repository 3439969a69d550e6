"""Does the service lose prompts when it is SIGKILLed? Clients store prompts over HTTP; the server is killed at a
random moment, restarted on the same store, and every prompt it acknowledged is checked through the restarted server.

    python benchmarks/server_crash.py [--model tiny|smollm2-135m] [--pgm DIR] [--rounds 10] [--clients 4]
                                      [--max-delay 3] [--seed 0] [--output DIR]

Each round starts `peft-metal serve` (or, for `--model tiny`, the tiny random PGM of `serving_load.py`: durability
does not depend on the model, and a tiny one makes many prompts per second) on one store folder, runs C clients that
POST /v1/prompts with new shots (and now and then DELETE one of their own acknowledged prompts), and SIGKILLs the
server a random time after it is up. A prompt counts as acknowledged when its 201/200 came back before the kill, a
delete when its 204 did; requests in flight at the kill may go either way. The server is then restarted on the store
and checked:

- lost: acknowledged prompts that GET /v1/prompts/{id} no longer finds, or that a completion cannot be served from: 0
  expected (a completion reads the prompt's file, checksum verified);
- undeleted: acknowledged deletes whose prompt is back: 0 expected;
- damaged: what `PromptStore.verify()` finds damaged after the last round: 0 expected.

Writes `server_crash.json` and `server_crash.md` into DIR (default benchmarks/results/). POSIX only (SIGKILL).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sys
import tempfile
from pathlib import Path

import httpx
from report import write_report  # benchmarks/report.py: the JSON + markdown every benchmark leaves
from serving_load import Server  # the same server process the load benchmark starts

TASK = "crash"


async def store_until_killed(url: str, round_index: int, clients: int, rng: random.Random) -> dict[str, set[str]]:
    """C clients store prompts (and delete some of theirs) until the server stops answering."""
    acknowledged: dict[str, set[str]] = {"stored": set(), "deleted": set()}

    async def client(number: int) -> None:
        mine: list[str] = []
        async with httpx.AsyncClient(base_url=url, timeout=60.0) as http:
            for step in range(10**9):
                try:
                    if mine and rng.random() < 0.15:
                        prompt_id = mine.pop(rng.randrange(len(mine)))
                        if (await http.delete(f"/v1/prompts/{prompt_id}")).status_code == 204:
                            acknowledged["stored"].discard(prompt_id)
                            acknowledged["deleted"].add(prompt_id)
                        continue
                    shots = [
                        {"input": f"round {round_index} client {number} step {step} example {j}", "output": rng.choice(["yes", "no"])}
                        for j in range(4)
                    ]
                    body = {"task": TASK, "shots": shots, "num_demonstrations": rng.randrange(2)}
                    response = await http.post("/v1/prompts", json=body)
                except httpx.HTTPError:  # the server is gone
                    return
                if response.status_code in (200, 201):
                    prompt_id = response.json()["prompt_id"]
                    acknowledged["stored"].add(prompt_id)
                    mine.append(prompt_id)
                else:
                    raise RuntimeError(f"POST /v1/prompts answered {response.status_code}: {response.text}")

    await asyncio.gather(*(client(number) for number in range(clients)))
    return acknowledged


def check(url: str, stored: set[str], deleted: set[str]) -> dict[str, list[str]]:
    """Through the restarted server: every acknowledged prompt is found and served, every acknowledged delete holds."""
    lost, undeleted = [], []
    with httpx.Client(base_url=url, timeout=120.0) as http:
        for prompt_id in sorted(stored):
            found = http.get(f"/v1/prompts/{prompt_id}").status_code == 200
            served = http.post("/v1/completions", json={"model": f"metal:{prompt_id}", "prompt": "check", "max_tokens": 1})
            if not found or served.status_code != 200:
                lost.append(prompt_id)
        for prompt_id in sorted(deleted):
            if http.get(f"/v1/prompts/{prompt_id}").status_code != 404:
                undeleted.append(prompt_id)
    return {"lost": lost, "undeleted": undeleted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny (default), or smollm2-135m or any model `peft-metal serve` takes")
    parser.add_argument("--pgm", help="a saved PGM for a real model's server")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-delay", type=float, default=3.0, help="kill delay is uniform in [0.2, max] s after the server is up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    server_args = argparse.Namespace(model=args.model, pgm=args.pgm)
    rng = random.Random(args.seed)
    stored: set[str] = set()
    deleted: set[str] = set()
    rounds = []
    runs = Path(__file__).resolve().parent.parent / "runs"  # on the repository's disk: fsync means something there
    runs.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="peft-metal-server-crash-", dir=runs) as workdir:
        store, log = Path(workdir) / "store", Path(workdir) / "server.log"
        for index in range(args.rounds):
            server = Server(server_args, store, window_ms=5.0, max_batch=16, log=log)
            server.wait_ready()
            delay = rng.uniform(0.2, args.max_delay)
            loop_rng = random.Random(rng.random())

            async def run_round() -> dict[str, set[str]]:
                storing = asyncio.ensure_future(store_until_killed(server.url, index, args.clients, loop_rng))
                await asyncio.sleep(delay)
                server.kill()
                return await storing

            acknowledged = asyncio.run(run_round())
            stored = (stored | acknowledged["stored"]) - acknowledged["deleted"]
            deleted |= acknowledged["deleted"]
            restarted = Server(server_args, store, window_ms=5.0, max_batch=16, log=log)
            try:
                restarted.wait_ready()
                found = check(restarted.url, stored, deleted)
            finally:
                restarted.kill()  # the next round's kill is the experiment; this one just ends the check quickly
            row = {
                "round": index,
                "kill_delay_s": round(delay, 3),
                "acknowledged_stores": len(acknowledged["stored"]),
                "acknowledged_deletes": len(acknowledged["deleted"]),
                "prompts_checked": len(stored),
                "lost": found["lost"],
                "undeleted": found["undeleted"],
            }
            rounds.append(row)
            print(
                f"round {index + 1}/{args.rounds}: killed after {delay:.2f} s; {row['acknowledged_stores']} stores and "
                f"{row['acknowledged_deletes']} deletes acknowledged; {len(stored)} prompts checked, "
                f"{len(found['lost'])} lost, {len(found['undeleted'])} undeleted",
                flush=True,
            )

        from peft_metal.serving import PromptStore

        with PromptStore(store) as prompt_store:
            final = prompt_store.verify()
            in_store = len(prompt_store)
    summary = {
        "rounds": args.rounds,
        "prompts_in_store": in_store,
        "prompts_verified": len(final["ok"]),
        "acknowledged_prompts": len(stored),
        "acknowledged_deletes": len(deleted),
        "lost": len({i for row in rounds for i in row["lost"]}),
        "undeleted": len({i for row in rounds for i in row["undeleted"]}),
        "damaged": len(final["damaged"]),
    }
    machine = ", ".join(part for part in (platform.machine(), f"{os.cpu_count()} CPUs", f"Python {platform.python_version()}") if part)
    command = " ".join(["python", "benchmarks/server_crash.py", *sys.argv[1:]])
    report = {"command": command, "machine": machine, "model": args.model, "pgm": args.pgm, "summary": summary, "rounds": rounds}
    lines = [
        f"`{command}` on {machine}; model {args.model}, {args.clients} clients storing prompts over HTTP, the server "
        f"SIGKILLed uniformly in [0.2, {args.max_delay}] s after it is up, then restarted on the same store.",
        "",
        "| rounds | acknowledged prompts (checked after the last round) | acknowledged deletes | in store | verified | lost | undeleted | damaged |",
        "|---|---|---|---|---|---|---|---|",
        f"| {summary['rounds']} | {summary['acknowledged_prompts']} | {summary['acknowledged_deletes']} | {summary['prompts_in_store']} | "
        f"{summary['prompts_verified']} | {summary['lost']} | {summary['undeleted']} | {summary['damaged']} |",
    ]
    write_report(args.output, "server_crash", report, lines)
    if summary["lost"] or summary["undeleted"] or summary["damaged"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
