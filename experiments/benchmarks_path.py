"""Puts benchmarks/ on the import path, so that a probe here imports the helpers it shares with the maintained
benchmarks (`report`, `timing`, `task_carrying`, `learning_curve`) as they do: `import benchmarks_path` before those imports.

`python experiments/<probe>.py` puts experiments/ itself on the path (the probes' own helpers: `panel_probe`,
`paired_difference`, `prompt_target_gap`), as `python benchmarks/<name>.py` does benchmarks/.
"""

import sys
from pathlib import Path

BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.append(BENCHMARKS)
