"""Does the prompt store survive SIGKILL? A writer process is killed at a random moment, N times, on one store folder.

    python benchmarks/store_crash.py [--rounds 20] [--store DIR] [--max-delay 1.5] [--seed 0] [--output DIR]

Each round starts a writer process on the store (default: a new folder under runs/, on the disk the repository is
on; tmpfs would make fsync meaningless, so the report names the filesystem). The writer stores prompts in a loop
(get_or_create with new shots, re-requests of earlier ones, and some deletes) and reports each call on stdout once it
has returned; after a random delay it is SIGKILLed, wherever it is. The store is then reopened and checked:

- lost: prompts whose last reported call was a store that returned, missing or invalid now: 0 expected;
- damaged: stored prompts whose file does not match its row: 0 expected;
- undeleted: prompts whose last reported call was a delete that returned, stored now: 0 expected;
- leftovers: temporary/orphan files and interrupted deletes the kill left, cleaned on reopen (a kill mid-write).

It measures durability, not quality, so the prompts come from tiny random models (a 2-layer Llama of width 32 with a
char-level tokenizer, one PGM per design, all four designs), built the same way in every round so every round adds to
one store for the same base model. Writes `store_crash.json` and `store_crash.md` into DIR (default
benchmarks/results/) and prints the table. POSIX only (SIGKILL).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from report import write_report  # benchmarks/report.py: the JSON + markdown every benchmark leaves

REPO = Path(__file__).resolve().parent.parent
DESIGNS = ("discrete", "weighted_sum", "hidden_state", "prefix")
TASK = "crash"


# ----------------------------------------------------------------------------------------------------------- writer


def tiny_pgms() -> tuple[Any, dict[str, Any]]:
    """A char-level tokenizer and one PGM per design over identical tiny random Llamas (seeded: same every round)."""
    import torch
    from peft import get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from peft_metal import MetaLPromptConfig

    vocab = {chr(i): i for i in range(32, 127)} | {"\n": 127, "<unk>": 0, "<pad>": 1}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=1, bos_token_id=2, eos_token_id=3,
    )
    pgms = {}
    for design in DESIGNS:
        torch.manual_seed(0)
        lm = LlamaForCausalLM(config).eval()
        torch.manual_seed(1)
        metal = MetaLPromptConfig(
            task_type="CAUSAL_LM", prompt_design=design, num_prompt_tokens=8, r=4, init_lora_weights=False
        )
        pgms[design] = get_peft_model(lm, metal).eval()
    return tokenizer, pgms


def pgm_weights_fingerprint(model: Any) -> str:
    """Hash of the trainable weights (LoRA + padding): part of the key, so a retrained PGM gets new ids."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def run_writer(store_dir: Path, round_index: int) -> None:
    """Store prompts until killed; each line on stdout is printed only after the call it reports returned."""
    import torch

    from peft_metal.serving import PromptStore

    torch.set_num_threads(1)
    tokenizer, pgms = tiny_pgms()
    keys = {
        design: (model.base_model.base_fingerprint(), {**model.peft_config["default"].to_dict(), "pgm_weights": pgm_weights_fingerprint(model)})
        for design, model in pgms.items()
    }
    store = PromptStore(store_dir)
    rng = random.Random(round_index)
    requests: list[tuple[str, list[tuple[str, str]], int]] = []
    print("ready", flush=True)
    for step in range(10**9):
        choice = rng.random()
        if choice < 0.1 and requests:  # delete one of this round's prompts
            design, shots, split = rng.choice(requests)
            prompt_id = _key(design, shots, split, keys)
            print("deleting", prompt_id, flush=True)
            store.delete(prompt_id)
            print("deleted", prompt_id, flush=True)
            continue
        if choice < 0.3 and requests:  # ask again: served from the store (or made again if deleted)
            design, shots, split = rng.choice(requests)
        else:
            design = DESIGNS[step % len(DESIGNS)]
            shots = [(f"round {round_index} step {step} example {j}", rng.choice(["yes", "no"])) for j in range(3)]
            split = rng.randrange(3)
            requests.append((design, shots, split))
        fingerprint, config = keys[design]
        print("storing", _key(design, shots, split, keys), flush=True)  # the call a kill may interrupt: either outcome is right
        with torch.no_grad():
            make = lambda: pgms[design].generate_prompt(shots, tokenizer=tokenizer, num_demonstrations=split)  # noqa: B023,E731
            prompt_id, _, cached = store.get_or_create(TASK, shots, split, fingerprint, config, make)
        print("stored", prompt_id, flush=True)


def _key(design: str, shots: list[tuple[str, str]], split: int, keys: dict[str, Any]) -> str:
    from peft_metal.serving import prompt_key

    fingerprint, config = keys[design]
    return prompt_key(TASK, shots, split, fingerprint, config)


# ------------------------------------------------------------------------------------------------------- experiment


def filesystem_of(path: Path) -> str:
    """The mount (type) holding `path`, from /proc/mounts, so the report says whether fsync meant anything."""
    try:
        mounts = [line.split()[:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    resolved = str(path.resolve())
    best = max((m for m in mounts if resolved == m[1] or resolved.startswith(m[1].rstrip("/") + "/")), key=lambda m: len(m[1]), default=None)
    return f"{best[2]} ({best[1]})" if best else "unknown"


def one_round(store_dir: Path, round_index: int, delay: float, expected: dict[str, str]) -> dict[str, Any]:
    """Start a writer, SIGKILL it `delay` seconds after it is ready, then check the store against what it reported."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    writer = subprocess.Popen(
        [sys.executable, __file__, "--writer", str(store_dir), "--round", str(round_index)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    events: list[list[str]] = []
    ready = threading.Event()

    def read() -> None:
        for line in writer.stdout:
            if line.strip() == "ready":
                ready.set()
            else:
                events.append(line.split())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not ready.wait(timeout=300):
            raise RuntimeError(f"The writer never got ready: {writer.stderr.read() if writer.poll() is not None else '(still starting)'}")
        time.sleep(delay)
        if writer.poll() is not None:
            raise RuntimeError(f"The writer died by itself (exit {writer.returncode}): {writer.stderr.read()}")
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()
        reader.join(timeout=30)
    for event, prompt_id in events:  # in the order the writer saw its calls return
        expected[prompt_id] = event

    from peft_metal.serving import PromptStore

    with PromptStore(store_dir, cleanup_on_open=False) as store:
        before = store.verify()  # what the kill left, as a reader would see it
        after = store.verify(repair=True)
        ok = set(after["ok"])
        lost = sorted(i for i, state in expected.items() if state == "stored" and i not in ok)
        undeleted = sorted(i for i, state in expected.items() if state == "deleted" and i in store)
        return {
            "round": round_index,
            "kill_delay_s": round(delay, 3),
            "calls_reported": len(events),
            "stored_calls": sum(event == "stored" for event, _ in events),  # returned (made or served from the store)
            "deletes": sum(event == "deleting" for event, _ in events),
            "killed_during": _last_call(events),
            "leftovers": len(before["orphans"]) + len(before["interrupted"]) + len(before["in_progress"]),
            "restored_deletes": len(after["restored"]),
            "prompts_in_store": len(store),
            "damaged": sorted(set(before["damaged"]) | set(after["damaged"])),
            "lost": lost,
            "undeleted": undeleted,
        }


def _last_call(events: list[list[str]]) -> str:
    """What the writer was doing when killed: a call it announced and did not finish, or "model building"."""
    if events and events[-1][0] in ("storing", "deleting"):
        return "store" if events[-1][0] == "storing" else "delete"
    return "between calls" if events else "start"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--store", type=Path, default=None, help="an empty or new folder (default: runs/store_crash-<time>)")
    parser.add_argument("--max-delay", type=float, default=1.5, help="kill delay is uniform in [0, max] after the writer is ready")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--writer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer is not None:
        run_writer(args.writer, args.round)
        return

    store_dir = args.store or REPO / "runs" / f"store_crash-{time.strftime('%Y%m%d-%H%M%S')}"
    if store_dir.exists() and any(store_dir.iterdir()):
        parser.error(f"{store_dir} is not empty; give a new or empty folder for the experiment's store.")
    store_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    expected: dict[str, str] = {}
    rounds = []
    for index in range(args.rounds):
        row = one_round(store_dir, index, rng.uniform(0, args.max_delay), expected)
        rounds.append(row)
        print(
            f"round {index + 1}/{args.rounds}: killed after {row['kill_delay_s']:.2f}s during a {row['killed_during']}, "
            f"{row['stored_calls']} stores, {row['deletes']} deletes, {row['leftovers']} leftovers, "
            f"{len(row['damaged'])} damaged, {len(row['lost'])} lost, {len(row['undeleted'])} undeleted",
            flush=True,
        )

    from peft_metal.serving import PromptStore

    with PromptStore(store_dir) as store:  # the final check: every stored prompt, loaded through the store
        final = store.verify()
        served = sum(1 for row in store.list() if store.get(row["prompt_id"]) is not None)
        stored = len(store)
    lost = sorted({i for row in rounds for i in row["lost"]} | {i for i, s in expected.items() if s == "stored" and i not in final["ok"]})
    summary = {
        "rounds": args.rounds,
        "prompts_stored": stored,
        "prompts_verified": len(final["ok"]),
        "prompts_served": served,
        "damaged": len(set(final["damaged"]) | {i for row in rounds for i in row["damaged"]}),
        "lost": len(lost),
        "undeleted": len({i for row in rounds for i in row["undeleted"]}),
        "store_calls_reported": sum(row["stored_calls"] for row in rounds),
        "deletes_started": sum(row["deletes"] for row in rounds),
        "rounds_with_leftovers": sum(1 for row in rounds if row["leftovers"]),
        "interrupted_deletes_restored": sum(row["restored_deletes"] for row in rounds),
    }
    machine = ", ".join(part for part in (platform.machine(), platform.processor(), f"Python {platform.python_version()}") if part)
    report = {
        "command": " ".join(["python", "benchmarks/store_crash.py", *sys.argv[1:]]),
        "store": str(store_dir),
        "filesystem": filesystem_of(store_dir),
        "machine": machine,
        "max_kill_delay_s": args.max_delay,
        "seed": args.seed,
        "summary": summary,
        "rounds": rounds,
    }
    lines = [
        f"`{report['command']}` on {machine}, store on {report['filesystem']}",
        "",
        "Each round SIGKILLs a writer process at a random moment (uniform in [0, "
        f"{args.max_delay}] s after it is ready); prompts come from tiny random models: this measures durability only.",
        "",
        "| rounds | prompts stored | prompts verified | damaged | lost | undeleted | rounds with leftovers cleaned | interrupted deletes restored |",
        "|---|---|---|---|---|---|---|---|",
        f"| {summary['rounds']} | {summary['prompts_stored']} | {summary['prompts_verified']} | {summary['damaged']} | "
        f"{summary['lost']} | {summary['undeleted']} | {summary['rounds_with_leftovers']} | {summary['interrupted_deletes_restored']} |",
        "",
        "| round | kill delay (s) | killed during | stores | deletes | leftovers | prompts in store | damaged | lost | undeleted |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rounds:
        lines.append(
            f"| {row['round'] + 1} | {row['kill_delay_s']:.2f} | {row['killed_during']} | {row['stored_calls']} | "
            f"{row['deletes']} | {row['leftovers']} | {row['prompts_in_store']} | {len(row['damaged'])} | {len(row['lost'])} | "
            f"{len(row['undeleted'])} |"
        )
    write_report(args.output, "store_crash", report, lines)
    if summary["lost"] or summary["damaged"] or summary["undeleted"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
