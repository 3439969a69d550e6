"""Users' own tasks, from a JSONL file or a `datasets.Dataset`, as `Task`s.

Each record is `{"input", "output"}` (generative) or `{"input", "options", "answer"}` (multiple choice, `answer` being
the correct option's text or its 0-based index). MetaICL's records, `{"input", "output", "options"}`, are read too:
`output` is then the correct option's text, and empty `options` mean a generative example. Other keys, such as an id or
a task column, are ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .task import Example, Task, drop_duplicates, make_example

RECORD_FORMAT = "{'input', 'output'}, {'input', 'options', 'answer'} or MetaICL's {'input', 'output', 'options'}"


def example_from_record(record: Any, where: str) -> Example:
    """One user record as an `Example`; `where` (file and line, or row) prefixes every error."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected an object {RECORD_FORMAT}, got {type(record).__name__}.")
    if "input" not in record:
        raise ValueError(f"{where}: missing 'input' (keys present: {sorted(record)}); expected {RECORD_FORMAT}.")
    if "output" in record and "answer" in record:
        raise ValueError(f"{where}: give either 'output' or 'options' + 'answer', not both.")
    if "output" in record and "options" in record:  # MetaICL's record
        if not isinstance(record["output"], str):
            raise ValueError(f"{where}: 'output' must be the correct option's text, got {record['output']!r}.")
        record = {"input": record["input"], "options": record["options"], "answer": record["output"]}
        if isinstance(record["options"], (list, tuple)) and not record["options"]:  # MetaICL's generative tasks
            return make_example(where, input=record["input"], output=record["answer"])
    is_multiple_choice = "options" in record or "answer" in record
    if not is_multiple_choice:
        if "output" not in record:
            raise ValueError(f"{where}: missing 'output' (keys present: {sorted(record)}); expected {RECORD_FORMAT}.")
        return make_example(where, input=record["input"], output=record["output"])

    for key in ("options", "answer"):
        if key not in record:
            raise ValueError(f"{where}: a multiple-choice record needs 'options' and 'answer'; {key!r} is missing.")
    options, answer = record["options"], record["answer"]
    if isinstance(options, (str, bytes)) or not isinstance(options, (list, tuple)):
        raise ValueError(f"{where}: 'options' must be a list of strings, got {type(options).__name__}.")
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(options):
            raise ValueError(f"{where}: 'answer' index {answer} is out of range for {len(options)} options.")
        answer = options[answer]
    elif not isinstance(answer, str):
        raise ValueError(f"{where}: 'answer' must be the correct option's text or its 0-based index, got {answer!r}.")
    return make_example(where, input=record["input"], output=answer, options=tuple(options))


def read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for every non-blank line of a JSONL file, `where` naming the file and the line; a line that is
    not JSON raises, named so."""
    with path.open(encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path} line {line_number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg}).") from error


def load_jsonl_task(path: str | os.PathLike, name: str | None = None) -> Task:
    """A task from a JSONL file, one record per line (blank lines are skipped); `name` defaults to the file stem."""
    path = Path(path)
    examples = [example_from_record(record, where) for where, record in read_jsonl(path)]
    if not examples:
        raise ValueError(f"{path} holds no records; expected one JSON object {RECORD_FORMAT} per line.")
    return Task(name or path.stem, drop_duplicates(examples, str(path)))


def task_from_dataset(dataset: Iterable[Mapping[str, Any]], name: str) -> Task:
    """A task from a `datasets.Dataset` or any iterable of dict rows (rename columns to match the record format)."""
    if isinstance(dataset, Mapping):
        raise TypeError(
            f"Got a mapping ({type(dataset).__name__}), not rows; for a DatasetDict pick one split, e.g. "
            f"dataset['train']."
        )
    if isinstance(dataset, (str, bytes)) or not isinstance(dataset, Iterable):
        raise TypeError(f"Expected a datasets.Dataset or an iterable of dict rows, got {type(dataset).__name__}.")
    examples = [example_from_record(row, f"{name} row {index}") for index, row in enumerate(dataset)]
    if not examples:
        raise ValueError(f"Dataset for task {name!r} has no rows.")
    return Task(name, drop_duplicates(examples, name))
