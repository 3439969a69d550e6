"""A run's `log.jsonl`: one JSON record per logged step, appended as the run goes.

A run killed between checkpoints has logged steps whose weights were lost; resuming replays them from the last
checkpoint, so the log keeps only what that checkpoint saw, as transformers' Trainer restores its `log_history`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional


def read_log(path: Path, through_step: Optional[int] = None) -> list[dict[str, Any]]:
    """The log's records in order (those of steps up to `through_step`, when given); none when there is no log."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not a JSON record ({error.msg}); mend or delete that line.") from None
    return [record for record in records if through_step is None or record.get("step", 0) <= through_step]


def truncate_log(path: Path, step: int) -> int:
    """Drop the records past `step` (a resume's checkpoint), replacing the file whole; how many were dropped."""
    records = read_log(path)
    kept = [record for record in records if record.get("step", 0) <= step]
    if len(kept) < len(records):
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(json.dumps(record) + "\n" for record in kept))
        os.replace(partial, path)
    return len(records) - len(kept)
