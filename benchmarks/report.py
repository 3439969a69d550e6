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


def provenance() -> dict[str, Any]:
    """The command as it was typed and the machine it ran on, for a report's JSON."""
    return {
        "command": " ".join(["python", *sys.argv]),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
    }


def write_report(output: Path, name: str, report: dict[str, Any], markdown_lines: list[str]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = "\n".join(markdown_lines) + "\n"
    (output / f"{name}.md").write_text(markdown)
    print(markdown, end="")


def write_records_report(output: Path, name: str, caption: str, records: list[dict[str, Any]], **fields: Any) -> None:
    """A report of evaluation records (one per task and method): the caption and their table in markdown; provenance,
    `fields`, the summary and every record in JSON."""
    report = {**provenance(), **fields, "summary": summary(records), "records": records}
    write_report(output, name, report, [caption, "", markdown_table(records)])
