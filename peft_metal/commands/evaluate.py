"""`peft-metal eval`: zero-shot, ICL, MetaL-Prompt and PEFT baselines on the same seeded shots and queries."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .common import load_pgm_for

METAICL_QUERIES = 100  # test queries per seed under MetaICL's protocol, unless --queries says otherwise



def add_parser(commands: argparse._SubParsersAction) -> None:
    from ..data.metaicl import SEEDS as METAICL_SEEDS
    from ..evaluation.panels import PANELS
    from ..evaluation.settings import DEFAULT_SHOTS

    evaluation = commands.add_parser(
        "eval", help="compare zero-shot, in-context learning, MetaL-Prompt and PEFT prompt-learning baselines on the "
        "same seeded shots and queries"
    )
    evaluation.add_argument("--model", default="smollm2-135m", help="smollm2-135m, or a transformers model id or folder")
    evaluation.add_argument(
        "--pgm", help="a saved PGM (folder or Hub id); default: the one shipped for --model, else a fresh untrained one"
    )
    which = evaluation.add_mutually_exclusive_group(required=True)
    which.add_argument("--tasks", help="comma-separated task names (dev or train families; reserved ones are refused)")
    which.add_argument(
        "--split", choices=("dev", "train", *PANELS),
        help="every task of a split (of --metaicl's splits.json, else of bigbench_splits.json), or a named panel "
        "(evaluation/panels.py): dev-panel, MetaICL's protocol on its 10 dev tasks (5 seeds x 100 queries); "
        "dev-panel-tasks, the BIG-bench-format dev tasks; bigbench-panel(-confirm), BIG-bench's own. A panel's "
        "tasks come from --metaicl / --task-dir, else from $PEFT_METAL_DATA",
    )
    evaluation.add_argument(
        "--metaicl", metavar="DIR",
        help="a MetaICL data folder (data/<task>/<task>_<k>_<seed>_<split>.jsonl, splits.json): MetaICL's protocol, "
        "each seed's k given demonstrations as the shots and a fixed draw of --queries test queries per seed "
        f"(default seeds {','.join(map(str, METAICL_SEEDS))}, {METAICL_QUERIES} queries)",
    )
    evaluation.add_argument(
        "--task-dir", help="a folder of BIG-bench-format task folders (default: $PEFT_METAL_BIGBENCH_TASKS, a clone's)"
    )
    evaluation.add_argument("--shots", type=int, default=DEFAULT_SHOTS, help=f"k shots per task (default {DEFAULT_SHOTS})")
    evaluation.add_argument(
        "--queries", type=int, help="queries per task and seed (default 50; --metaicl: at most 100; a panel: its own)"
    )
    evaluation.add_argument(
        "--methods", default="zero_shot,icl,metal",
        help="comma-separated: zero_shot, icl, demos, metal, metal+demos, metal+refine, metal+demos+refine, prompt_tuning, "
        "p_tuning, prefix_tuning",
    )
    evaluation.add_argument(
        "--seed", default=None,
        help="seed of the shot/query draw, or comma-separated seeds whose records are merged (default 0; --metaicl: "
        "MetaICL's five; a panel: its own)",
    )
    evaluation.add_argument(
        "--precision", choices=("auto", "fp32", "bf16"), default="auto",
        help="weights of the frozen LM: auto = bf16 on a CPU with AMX / AVX512-BF16 or a bf16 GPU, else fp32",
    )
    evaluation.add_argument(
        "--num-demonstrations", type=int, default=4, help="d, the shots metal+demos(+refine) keeps as demonstrations and demos shows alone (default 4)"
    )
    evaluation.add_argument(
        "--refine-steps", default="10",
        help="metal+refine, metal+demos+refine: refinement steps, or a comma-separated list (e.g. 0,5,10,20: one record per count; 0 = metal)",
    )
    evaluation.add_argument(
        "--refine-lr", type=float,
        help="the refined methods' Adam learning rate (default: refine_prompt's, 5e-2, measured on dev)",
    )
    evaluation.add_argument(
        "--refine-batch-size", type=int,
        help="the refined methods' shots per Adam step (default: refine_prompt's, 8); as many as the shots refined on "
        "or more: every step on all of them",
    )
    evaluation.add_argument(
        "--baseline-steps", type=int, default=50, help="prompt_tuning/p_tuning/prefix_tuning: training steps (default 50)"
    )
    evaluation.add_argument(
        "--baseline-lr", type=float,
        help="baselines' Adam learning rate (default per method: prompt_tuning 3e-2, p_tuning 1e-3, prefix_tuning 1e-2)",
    )
    evaluation.add_argument(
        "--num-virtual-tokens", type=int, help="baselines' virtual tokens (default: the PGM's num_prompt_tokens)"
    )
    evaluation.add_argument(
        "--prompt-tuning-init", choices=("text", "random", "sample_vocab"), default="text",
        help="prompt_tuning initialization (default text: a generic instruction, see evaluation/baselines.py)",
    )
    evaluation.add_argument(
        "--p-tuning-encoder", choices=("MLP", "LSTM"), default="MLP", help="p_tuning reparameterization (default MLP)"
    )
    evaluation.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens for generative tasks (default 16)")
    evaluation.add_argument(
        "--metric", choices=("auto", "multiple_choice", "generative"), default="auto",
        help="auto: multiple choice for tasks with options, generative otherwise",
    )
    evaluation.add_argument(
        "--calibration", choices=("none", "shots"), default="none",
        help="shots: also score multiple choice with the option prior the method's context gives the task's own shots "
        "divided out (acc_calibrated, macro_f1_calibrated beside the usual metrics)",
    )
    evaluation.add_argument("--device", help="e.g. cuda or cpu (default: cuda if available)")
    evaluation.add_argument("--output", default="results.json", help="results JSON; .md and .png are written beside it")
    evaluation.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluation.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..data.metaicl import SEEDS as METAICL_SEEDS
    from ..evaluation import (
        BaselineOptions,
        EvaluationSettings,
        evaluate_seeds,
        load_eval_tasks,
        markdown_table,
        write_results,
    )
    from ..evaluation.panels import METAICL, PANELS, get_panel
    from ..evaluation.tasks import load_panel_tasks
    from ..precision import cast_frozen_weights

    try:
        panel = get_panel(args.split) if args.split in PANELS else None
        metaicl = args.metaicl is not None or (panel is not None and panel.source == METAICL)
        seeds = _seeds(args.seed, panel.seeds if panel else (METAICL_SEEDS if metaicl else (0,)))
        default_queries = panel.queries if panel else (METAICL_QUERIES if metaicl else 50)
        run = EvaluationSettings(
            args.methods, args.shots, args.queries if args.queries is not None else default_queries,
            num_demonstrations=args.num_demonstrations, max_new_tokens=args.max_new_tokens,
            metric=None if args.metric == "auto" else args.metric, refine_steps=args.refine_steps, refine_lr=args.refine_lr,
            calibration=args.calibration,
            **({} if args.refine_batch_size is None else {"refine_batch_size": args.refine_batch_size}),
            baseline=BaselineOptions(
                steps=args.baseline_steps, lr=args.baseline_lr, num_virtual_tokens=args.num_virtual_tokens,
                prompt_tuning_init=args.prompt_tuning_init, p_tuning_encoder=args.p_tuning_encoder,
            ),
        )
        # the settings first: a typo is named whether or not the task data is installed
        if panel is not None:
            tasks = load_panel_tasks(panel, args.metaicl if panel.source == METAICL else args.task_dir)
        else:
            tasks = load_eval_tasks(args.tasks, args.split, args.task_dir, args.metaicl, seeds, args.shots)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"peft-metal eval: error: {error}", file=sys.stderr)
        return 2
    model, tokenizer, pgm = load_pgm_for(args, seed=seeds[0])
    precision = cast_frozen_weights(model, args.precision)
    try:
        results = evaluate_seeds(model, tokenizer, tasks, run, seeds, progress=not args.no_progress)
    except (ValueError, TypeError) as error:
        print(f"peft-metal eval: error: {error}", file=sys.stderr)
        return 2
    settings = {
        "model": args.model, "pgm": pgm, "tasks": [task.name for task in tasks], "seeds": list(seeds),
        "task_source": args.metaicl or args.task_dir,
        **run.to_dict(), "metric": args.metric, "precision": precision, "panel": panel.name if panel else None,
    }
    paths = write_results(results, args.output, settings=settings)
    print(markdown_table(results))
    print("Wrote " + ", ".join(str(path) for path in paths.values()))
    return 1 if results and all("error" in record for record in results) else 0


def _seeds(text: Optional[str], default: tuple[int, ...]) -> tuple[int, ...]:
    if text is None:
        return default
    try:
        seeds = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        raise ValueError(f"--seed must be an int or comma-separated ints, got {text!r}.") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seed {text!r} repeats a seed.")
    return seeds
