"""A run's `log.jsonl`: one JSON record per logged step, appended as the run goes.

A run killed between checkpoints has logged steps whose weights were lost; resuming replays them from the last
checkpoint, so the log keeps only what that checkpoint saw, as transformers' Trainer restores its `log_history`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional


def _records(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The log's records, and whether it ends in an unfinished line: a kill mid-write leaves a last line without its
    newline (each record is written whole with its newline), which is no record and is left out."""
    lines = path.read_text().split("\n")
    unfinished = lines.pop() != ""
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not a JSON record ({error.msg}); mend or delete that line.") from None
    return records, unfinished


def read_log(path: Path, through_step: Optional[int] = None) -> list[dict[str, Any]]:
    """The log's records in order (those of steps up to `through_step`, when given); none when there is no log."""
    records = _records(path)[0] if path.exists() else []
    return [record for record in records if through_step is None or record.get("step", 0) <= through_step]


def truncate_log(path: Path, step: int) -> int:
    """Drop the records past `step` (a resume's checkpoint) and any unfinished last line, replacing the file whole;
    how many records were dropped."""
    if not path.exists():
        return 0
    records, unfinished = _records(path)
    kept = [record for record in records if record.get("step", 0) <= step]
    if len(kept) < len(records) or unfinished:
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(json.dumps(record) + "\n" for record in kept))
        os.replace(partial, path)
    return len(records) - len(kept)
