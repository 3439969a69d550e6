"""benchmarks/task_carrying.py: the relabelled condition shows another task's inputs under this task's labels."""

import sys
from pathlib import Path

import pytest

from peft_metal.data import Example

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
task_carrying = pytest.importorskip("task_carrying")


def test_foreign_shots_are_relabelled_onto_this_tasks_options_one_label_per_label():
    donor_options = ("ham", "spam")
    shots = [Example(text, label, options=donor_options) for text, label in (("win $$$", "spam"), ("hi mum", "ham"))]
    relabelled = task_carrying.relabelled(shots, ["negative", "positive", "neutral"])
    assert [shot.input for shot in relabelled] == ["win $$$", "hi mum"]  # the donor's inputs, kept
    assert [shot.output for shot in relabelled] == ["positive", "negative"]  # ham -> 1st option, spam -> 2nd
    assert all(shot.options == ("negative", "positive", "neutral") for shot in relabelled)
    # more donor labels than options: they wrap around, so every option still names some donor label
    many = [Example(str(i), label, options=("a", "b", "c")) for i, label in enumerate("abc")]
    assert [shot.output for shot in task_carrying.relabelled(many, ["x", "y"])] == ["x", "y", "x"]
