"""How every benchmark leaves its figures: `<name>.json` (everything measured) and `<name>.md` (the table quoted in
docs/results.md) side by side, the markdown also printed."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from peft_metal.evaluation.report import markdown_table, summary
from peft_metal.precision import cpu_has_fast_bf16


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (machines of one kind have differed: AMX or AVX2 only)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_description() -> str:
    """One line naming the machine a figure came from: architecture, CPU model, whether it multiplies bf16 in
    hardware (which decides `mixed_precision="auto"`), threads and torch."""
    bf16 = "bf16 in hardware" if cpu_has_fast_bf16() else "no bf16 hardware"
    return f"{platform.machine()}, {cpu_model()} ({bf16}), {torch.get_num_threads()} threads, torch {torch.__version__}"


def provenance() -> dict[str, Any]:
    """The command as it was typed and the machine it ran on, for a report's JSON."""
    return {
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            "platform": platform.platform(), "cpu": cpu_model(), "bf16_hardware": cpu_has_fast_bf16(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
        },
    }


def write_report(output: Path, name: str, report: dict[str, Any], markdown_lines: list[str]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(output, name, markdown_lines)


def write_markdown(output: Path, name: str, markdown_lines: list[str]) -> None:
    """`<name>.md` (also printed): for a report whose JSON is written elsewhere."""
    markdown = "\n".join(markdown_lines) + "\n"
    (output / f"{name}.md").write_text(markdown)
    print(markdown, end="")


def write_records_report(output: Path, name: str, caption: str, records: list[dict[str, Any]], **fields: Any) -> None:
    """A report of evaluation records (one per task and method): the caption and their table in markdown; provenance,
    `fields`, the summary and every record in JSON."""
    report = {**provenance(), **fields, "summary": summary(records), "records": records}
    write_report(output, name, report, [caption, "", markdown_table(records)])
