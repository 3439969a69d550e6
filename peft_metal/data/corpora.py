"""Where the task corpora are: one setting, `$PEFT_METAL_DATA`, a folder holding `metaicl/` (MetaICL's data folder:
`data/` and `splits.json`) and `tasks/` (`train/` and `dev/` folders of BIG-bench-format tasks).

The package ships no task data and never guesses a path: commands take folders as arguments, and fall back on this
setting only for the named dev panels. The Makefile and CI point it at the project's shared data.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "PEFT_METAL_DATA"
CORPORA = {
    "metaicl": "MetaICL's tasks (data/<task>/<task>_<k>_<seed>_<split>.jsonl and splits.json)",
    "tasks": "tasks in BIG-bench's JSON format (train/ and dev/ folders of task folders)",
}


def corpus_dir(name: str) -> Path:
    """`$PEFT_METAL_DATA/<name>` for `name` in `CORPORA`; raises naming the setting and what is missing."""
    if name not in CORPORA:
        raise ValueError(f"Unknown corpus {name!r}; expected one of {list(CORPORA)}.")
    root = os.environ.get(DATA_ENV)
    if not root:
        raise FileNotFoundError(
            f"{DATA_ENV} is not set: point it at a folder holding {name}/ ({CORPORA[name]}), or give the folder "
            "explicitly."
        )
    folder = Path(root) / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{DATA_ENV}={root} has no {name}/ folder ({CORPORA[name]}).")
    return folder
