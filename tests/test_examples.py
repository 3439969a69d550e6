"""The examples run as written (examples/README.md), or as fast variants of themselves on a tiny model: every
training config trains two steps from a PGM of its own shape, the evaluation commands of examples/evaluate run, and
the serving client talks to a served PGM. The quickstart runs on SmolLM2-135M itself (tests/test_smollm2.py)."""

from __future__ import annotations

import json
import re
import runpy
import shlex
from pathlib import Path

import pytest
from conftest import METAICL_DIR, TASKS_DIR, build_tokenizer, make_lm, make_pgm, serve_on_loopback

from peft_metal.cli import main
from peft_metal.training import MetaTrainer, TrainingArguments
from peft_metal.training.checkpoint import latest_checkpoint

pytestmark = pytest.mark.one_thread  # tiny models (conftest)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = sorted(EXAMPLES.glob("*/*.json"))
WORDS = [letter + end for letter in "abcdefghij" for end in "wxyz"]  # 40: room for 16 shots, 4 demos, 4 queries
LABELS = ["yes", "no"]


def _label(word: str) -> str:
    return "yes" if word[0] in "aeiou" else "no"


def _write_jsonl(path: Path, words: list[str], task: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{"task": task, "input": w, "output": _label(w), "options": LABELS} for w in words]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """A tiny LM and tokenizer saved as a model folder, a MetaICL data folder (train task `sound`, dev task `vowel`
    with seeds 100 and 13) and BIG-bench-format train/ and dev/ task folders."""
    root = tmp_path_factory.mktemp("examples")
    make_lm("llama", max_positions=4096).save_pretrained(root / "model")
    build_tokenizer().save_pretrained(root / "model")
    data = root / "metaicl" / "data"
    _write_jsonl(data / "sound" / "sound_16384_100_train.jsonl", WORDS, "sound")
    for seed in (100, 13):
        _write_jsonl(data / "vowel" / f"vowel_16_{seed}_train.jsonl", WORDS[:16] if seed == 100 else WORDS[16:32], "vowel")
    _write_jsonl(data / "vowel" / "vowel_16_100_test.jsonl", [w.upper() for w in WORDS[:12]], "vowel")
    (root / "metaicl" / "splits.json").write_text(json.dumps({"train": ["sound"], "dev": ["vowel"]}))
    for split, names in (("train", ("upper", "vowels")), ("dev", ("reverse",))):
        for name in names:
            folder = root / "tasks" / split / name
            folder.mkdir(parents=True)
            if name == "vowels":
                examples = [{"input": w, "target_scores": {"yes": int(w[0] in "aeiou"), "no": int(w[0] not in "aeiou")}}
                            for w in WORDS]
            else:
                examples = [{"input": w, "target": w.upper() if name == "upper" else w[::-1]} for w in WORDS]
            (folder / "task.json").write_text(json.dumps({"examples": examples}))
    return root


def test_every_example_is_listed_in_the_examples_readme():
    listed = (EXAMPLES / "README.md").read_text()
    folders = sorted(path.name for path in EXAMPLES.iterdir() if path.is_dir() and not path.name.startswith("_"))
    assert folders and all(f"[{name}/]({name}/)" in listed and (EXAMPLES / name / "README.md").is_file() for name in folders)


def test_the_shipped_recipe_is_the_shipped_pgms_recorded_settings():
    summary = json.loads((Path(__file__).resolve().parents[1] / "peft_metal/shipped/smollm2-135m/adapter_config.json").read_text())
    recorded = json.loads(summary["training_summary"]["settings"])
    recipe = TrainingArguments.from_json(EXAMPLES / "train_shipped_pgm" / "train_smollm2_shipped.json").to_dict()
    assert {name: recipe[name] for name in recorded if name != "extra"} == {
        name: value for name, value in recorded.items() if name != "extra"
    }


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_every_example_config_trains_two_steps_on_a_tiny_model(config, sources, tmp_path):
    """The config as written, with the tiny model, the tiny task folders in place of the corpora, its `init_from` a
    tiny PGM of the config's own shape, and two optimizer steps."""
    written = json.loads(config.read_text())
    overrides = {
        "output_dir": str(tmp_path / "run"), "model": str(sources / "model"), "max_steps": 2,
        "checkpoint_every": 1, "eval_every": 1, "eval_episodes": 2,
        "text_stage_steps": 1 if written.get("text_stage_steps") else None,
    }
    if "metaicl_dir" in written:
        overrides.update(metaicl_dir=str(sources / "metaicl"), metaicl_tasks=["sound"])
    if "task_dir" in written or "metaicl_dir" not in written:  # BIG-bench's own split is read from a clone; not here
        overrides.update(task_dir=str(sources / "tasks" / "train"), dev_task_dir=str(sources / "tasks" / "dev"))
    args = TrainingArguments.from_json(config, **overrides)
    if written.get("init_from"):
        pgm = make_pgm(
            "llama", args.prompt_design, lm=make_lm("llama", max_positions=4096), num_prompt_tokens=args.num_prompt_tokens,
            lora_scope=args.lora_scope, r=args.r, lora_alpha=args.lora_alpha, target_modules=args.target_modules,
            padding_reparameterization=args.padding_reparameterization,
        )
        pgm.save_pretrained(tmp_path / "init")
        args = TrainingArguments.from_json(config, **overrides, init_from=str(tmp_path / "init"))
    MetaTrainer(args).train()
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-2"


def _commands(folder: str) -> list[list[str]]:
    """The `peft-metal` commands of an example's README, each as its arguments."""
    text = (EXAMPLES / folder / "README.md").read_text()
    lines = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S)).replace("\\\n", " ").splitlines()
    return [shlex.split(line.split(" #")[0])[1:] for line in lines if line.startswith("peft-metal ")]


EVAL_COMMANDS = _commands("evaluate")


@pytest.mark.parametrize("argv", EVAL_COMMANDS, ids=lambda argv: argv[argv.index("--output") + 1])
def test_the_evaluation_examples_run_on_a_tiny_model(argv, sources, tmp_path):
    """Each command as written, on the tiny model and a tiny PGM, with fewer queries (and seeds); the named panels
    read the corpora ($PEFT_METAL_DATA), the MetaICL command the tiny MetaICL folder."""
    make_pgm("llama", "prefix", lm=make_lm("llama", max_positions=4096)).save_pretrained(tmp_path / "pgm")
    output = tmp_path / "results.json"
    fast = ["--model", str(sources / "model"), "--pgm", str(tmp_path / "pgm"), "--output", str(output), "--no-progress"]
    if "--metaicl" in argv:
        fast += ["--metaicl", str(sources / "metaicl"), "--tasks", "vowel", "--queries", "2"]
    else:
        if (METAICL_DIR if argv[argv.index("--split") + 1] == "dev-panel" else TASKS_DIR) is None:
            pytest.skip("the panel reads the corpora: needs $PEFT_METAL_DATA")
        fast += ["--queries", "1", "--shots", "1", "--seed", "100" if "dev-panel" == argv[argv.index("--split") + 1] else "0",
                 "--methods", "zero_shot,metal"]
    assert argv[0] == "eval" and main([*argv, *fast]) == 0
    assert json.loads(output.read_text())["results"]


def test_the_serving_client_talks_to_a_served_pgm(tmp_path, monkeypatch, capsys):
    """examples/serve/client.py against the service as `peft-metal serve` runs it, with a tiny model behind it."""
    from peft_metal.serving.app import create_app
    from peft_metal.serving.store import PromptStore

    pytest.importorskip("openai")
    app = create_app(make_pgm("llama", "prefix"), build_tokenizer(), PromptStore(tmp_path / "store"), api_key="k",
                     model_name="tiny-llama")
    monkeypatch.setenv("PEFT_METAL_API_KEY", "k")
    client = runpy.run_path(str(EXAMPLES / "serve" / "client.py"))
    with serve_on_loopback(app) as url:
        client["main"](["--url", url, "--base-model", "tiny-llama"])
    printed = capsys.readouterr().out
    assert "stored prompt: metal:" in printed and "client done" in printed
