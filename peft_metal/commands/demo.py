"""`peft-metal demo`: the main job, SmolLM2-135M and its PGM against zero-shot and ICL on dev tasks."""

from __future__ import annotations

import argparse


def add_parser(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="the main job: SmolLM2-135M and its PGM against zero-shot and ICL on dev tasks")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--pgm", default=None, help="a PGM folder or Hub id (default: the shipped one)")
    demo.add_argument("--shots", type=int, default=16)
    demo.add_argument("--queries", type=int, default=24)
    demo.add_argument(
        "--seed", type=int, help="the draw: a MetaICL seed (default 100, its first) or, on the example tasks, any (default 0)"
    )
    demo.add_argument("--device", default=None)
    demo.add_argument("--output", default="demo_results/results.json")
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import demo_tasks, run_demo
    from ..pgm import load_pgm

    tasks, task_source, seed = demo_tasks(args.seed)
    model, tokenizer, source = load_pgm(args.model, args.pgm, args.device, seed)
    run_demo(model, tokenizer, source or "fresh, untrained PGM", tasks, task_source, args.shots, args.queries, seed,
             args.output)
    return 0
