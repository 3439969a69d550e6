"""Run by `accelerate launch` in tests/test_training_distributed.py: a tiny meta-training run on every process.

    accelerate launch --cpu --num_processes 2 tests/accelerate_train.py OUTPUT_DIR [--stop-after N] [--resume]

Each process writes `exit-rank-<rank>.txt` into OUTPUT_DIR as it exits, after the trainer's own exit handler: whether
the process group was still alive then.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from conftest import build_tokenizer, make_pgm  # noqa: E402

from peft_metal.data import Example, Task  # noqa: E402
from peft_metal.training import MetaTrainer, TrainingArguments  # noqa: E402

WORDS = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st", "uv", "wx"]
MAX_STEPS = 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--stop-after", type=int)
    parser.add_argument("--resume", action="store_true")
    options = parser.parse_args()
    report = Path(options.output_dir) / f"exit-rank-{os.environ['LOCAL_RANK']}.txt"
    # registered before the trainer's handler, so it runs after it (atexit runs the last registered first)
    atexit.register(lambda: report.write_text(f"process group alive: {torch.distributed.is_initialized()}"))
    tasks = [Task("upper", [Example(w, w.upper()) for w in WORDS]), Task("reverse", [Example(w, w[::-1]) for w in WORDS])]
    args = TrainingArguments(
        output_dir=options.output_dir, prompt_design="prefix", lora_scope="padding", max_steps=MAX_STEPS,
        learning_rate=1e-2, warmup_steps=1, gradient_accumulation_steps=2, xp_range=(1, 3), xl_range=(0, 1),
        num_queries=2, checkpoint_every=2, eval_every=100, log_every=1, mixed_precision="fp32",
    )
    model = make_pgm("llama", "prefix", padding_reparameterization="mlp", lora_scope="padding")
    trainer = MetaTrainer(args, model=model, tokenizer=build_tokenizer(), train_tasks=tasks, dev_tasks=[])
    trainer.train(resume=options.resume, stop_after=options.stop_after)


if __name__ == "__main__":
    main()
