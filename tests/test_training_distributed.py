"""Meta-training on two processes of a CPU machine: the learning-rate schedule covers the same optimizer steps as
with one process, and a run stopped after a checkpoint resumes, on every process, to exactly the weights of an
uninterrupted two-process run.

The processes are started as `accelerate launch --multi_gpu --num_processes 2` starts them (torchrun); on a machine
without GPUs the trainer's Accelerator runs them on the CPU and shares gradients over gloo. (accelerate's `--cpu` flag
starts several processes only through MPI's mpirun, which this machine does not have.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import get_cosine_schedule_with_warmup

from peft_metal.cli import main
from peft_metal.training.launch import LAUNCHED_MARKER, accelerate_command, process_environment

SCRIPT = Path(__file__).with_name("accelerate_train.py")
ACCELERATE = Path(sys.executable).with_name("accelerate")


def launch(output: Path, *extra: str) -> None:
    command = accelerate_command([str(SCRIPT), str(output), *extra], processes=2)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=process_environment(2, threads=1))
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(not ACCELERATE.exists(), reason="needs the accelerate command next to this Python")
def test_two_processes_schedule_checkpoint_and_resume(tmp_path):
    launch(tmp_path / "whole")
    launch(tmp_path / "killed", "--stop-after", "2")
    checkpoint = tmp_path / "killed" / "checkpoint-2"
    assert {p.name for p in checkpoint.iterdir()} >= {"pgm", "state.json", "state.safetensors", "rank-1.json"}
    assert json.loads((checkpoint / "state.json").read_text())["num_processes"] == 2
    launch(tmp_path / "killed", "--resume")
    for run in ("whole", "killed"):  # every process left the process group before the interpreter wound down
        assert [(tmp_path / run / f"exit-rank-{rank}.txt").read_text() for rank in (0, 1)] == ["process group alive: False"] * 2

    whole = load_file(tmp_path / "whole" / "pgm" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed" / "pgm" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=0, msg=name)

    # the schedule is the one-process schedule over max_steps optimizer steps, not over max_steps / 2
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    schedule = get_cosine_schedule_with_warmup(optimizer, 1, 4)
    expected = []
    for _ in range(4):
        optimizer.step()
        schedule.step()
        expected.append(schedule.get_last_lr()[0])
    logged = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert [record["lr"] for record in logged if "lr" in record] == pytest.approx(expected)

    # every optimizer step took gradient_accumulation_steps (2) episodes on each of the 2 processes
    summary = json.loads((tmp_path / "whole" / "pgm" / "adapter_config.json").read_text())["training_summary"]
    assert summary["num_processes"] == 2 and summary["episodes"] == 4 * 2 * 2


def test_train_command_relaunches_itself_on_several_processes(monkeypatch):
    monkeypatch.delenv(LAUNCHED_MARKER, raising=False)
    launched = []

    def run(command, env):
        launched.append((command, env))
        return subprocess.CompletedProcess(command, returncode=3)

    monkeypatch.setattr(subprocess, "run", run)
    argv = ["train", "--config", "c.json", "--processes", "2", "--max-steps", "5", "--init-from", "pgm", "--resume"]
    assert main(argv) == 3  # the launch's exit status is the command's

    (command, env), = launched
    assert command[:3] == [str(ACCELERATE), "launch", "--multi_gpu"]
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[command.index("-m"):] == ["-m", "peft_metal.cli", *argv]  # every flag, as given
    assert env["OMP_NUM_THREADS"] == str(max(1, torch.get_num_threads() // 2))


def test_train_command_inside_a_launch_trains_in_this_process(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(LAUNCHED_MARKER, "0")
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: pytest.fail("launched again from a launched process"))
    assert main(["train", "--config", str(tmp_path / "missing.json"), "--processes", "2"]) == 2
    assert "missing.json" in capsys.readouterr().err  # it went on to read its config


def test_train_command_refuses_fewer_than_one_process(capsys):
    assert main(["train", "--config", "c.json", "--processes", "0"]) == 2
    assert "--processes must be at least 1, got 0" in capsys.readouterr().err


def test_train_command_overrides_reach_the_run_settings(monkeypatch, tmp_path):
    """A run continued over sessions is `--init-from` its last PGM with a new `--seed` and `--output-dir`: the flags
    replace the config's values, and what the config says otherwise stays."""
    import peft_metal.training

    built = []

    class Captured:
        def __init__(self, args):
            built.append(args)

        def train(self, resume):
            return {}

    monkeypatch.setattr(peft_metal.training, "MetaTrainer", Captured)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"output_dir": "first", "task_dir": str(tmp_path), "seed": 44, "max_steps": 9}))
    saved = tmp_path / "saved-pgm"
    argv = ["train", "--config", str(config), "--seed", "45", "--output-dir", "second", "--init-from", str(saved)]
    assert main(argv) == 0
    (args,) = built
    assert (args.seed, args.output_dir, args.init_from, args.max_steps) == (45, "second", str(saved), 9)
    assert main(["train", "--config", str(config)]) == 0
    assert (built[1].seed, built[1].output_dir) == (44, "first")
