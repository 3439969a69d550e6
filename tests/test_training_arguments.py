"""Training settings from JSON: every example and experiment config loads, and `extends` takes another config's settings first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peft_metal.training import TrainingArguments

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(ROOT.glob("examples/*/*.json")) + sorted(ROOT.glob("experiments/configs/*.json"))
CORPUS_SETTINGS = ("metaicl_dir", "task_dir", "dev_task_dir")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_example_config_loads(config):
    """Every config loads as it is run, from the repository's root; one that names a corpus this checkout lacks (the
    project's layout keeps them at ../shared) is skipped by name, since its settings check that the folder exists."""
    settings = TrainingArguments.settings_from_json(config)
    missing = [settings[name] for name in CORPUS_SETTINGS if settings.get(name) and not Path(settings[name]).is_dir()]
    if missing:
        pytest.skip(f"names task corpora not in this checkout: {missing}")
    assert TrainingArguments.from_json(config).output_dir.startswith("runs/")


def write(path: Path, **settings) -> Path:
    path.write_text(json.dumps(settings))
    return path


def test_extends_takes_the_base_settings_then_its_own(tmp_path):
    write(tmp_path / "base.json", output_dir="runs/base", learning_rate=1e-3, seed=3, num_prompt_tokens=16)
    (tmp_path / "variants").mkdir()
    write(tmp_path / "variants" / "mid.json", extends="../base.json", learning_rate=3e-5)
    leaf = write(tmp_path / "variants" / "leaf.json", extends="mid.json", output_dir="runs/leaf", num_prompt_tokens=64)
    args = TrainingArguments.from_json(leaf, seed=9)
    assert (args.output_dir, args.learning_rate, args.num_prompt_tokens, args.seed) == ("runs/leaf", 3e-5, 64, 9)


def test_extends_refuses_a_missing_base_a_circle_and_unknown_settings(tmp_path):
    missing = write(tmp_path / "a.json", extends="nowhere.json")
    with pytest.raises(ValueError, match="extends 'nowhere.json', but .*nowhere.json is not a file"):
        TrainingArguments.from_json(missing)
    write(tmp_path / "b.json", extends="c.json")
    write(tmp_path / "c.json", extends="b.json")
    with pytest.raises(ValueError, match="configs extend each other in a circle"):
        TrainingArguments.from_json(tmp_path / "b.json")
    write(tmp_path / "base.json", learning_rate=1e-3, lerning_rate=2e-3)
    with pytest.raises(ValueError, match=r"base.json: unknown training settings \['lerning_rate'\]"):
        TrainingArguments.from_json(write(tmp_path / "d.json", extends="base.json"))
