"""benchmarks/learning_curve.py keeps every scored point when two scorings write one report side by side."""

import json
import multiprocessing
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
learning_curve = pytest.importorskip("learning_curve")


def _write_points(path: str, seeds: list[int], steps: int) -> None:
    for step in range(steps):
        point = {"run": "runs/r", "step": step, "seeds": seeds, "episodes": step, "train_seconds": None}
        learning_curve.update_report(Path(path), lambda report, point=point: learning_curve.add_point(report, point))


def test_two_writers_keep_each_others_points(tmp_path):
    path = tmp_path / "curve.json"
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_write_points, args=(str(path), seeds, 40)) for seeds in ([0, 1], [2, 3])]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=60)
        assert writer.exitcode == 0
    points = learning_curve.read_report(path)["points"]
    assert sorted((tuple(p["seeds"]), p["step"]) for p in points) == sorted(
        (seeds, step) for seeds in ((0, 1), (2, 3)) for step in range(40)
    )


def test_a_point_scored_again_replaces_the_old_one(tmp_path):
    path = tmp_path / "curve.json"
    for score in (0.4, 0.5):
        point = {"run": "runs/r", "step": 7, "seeds": [0, 1], "score": score}
        learning_curve.update_report(path, lambda report, point=point: learning_curve.add_point(report, point))
    assert [p["score"] for p in json.loads(path.read_text())["points"]] == [0.5]
