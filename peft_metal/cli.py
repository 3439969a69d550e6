"""The `peft-metal` command: `train`, `eval`, `serve` and `demo`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

METAICL_QUERIES = 100  # test queries per seed under MetaICL's protocol, unless --queries says otherwise
DEV_RESULTS_HELP = (
    "results.json files of `peft-metal eval` (one per draw of the panel) whose means go into the model card, each "
    "labelled with its panel and seeds"
)


def _train(args: argparse.Namespace) -> int:
    from .training import MetaTrainer, TrainingArguments
    from .training.launch import is_launched

    if args.processes < 1:
        print(f"peft-metal train: error: --processes must be at least 1, got {args.processes}", file=sys.stderr)
        return 2
    if args.processes > 1 and not is_launched():
        return _launch_training(args)
    try:  # the settings and the tasks, checked before anything trains
        training_args = TrainingArguments.from_json(
            args.config, output_dir=args.output_dir, max_steps=args.max_steps, init_from=args.init_from
        )
        if training_args.task_dir is None and training_args.metaicl_dir is None and not _has_task_data("train"):
            return 2
        trainer = MetaTrainer(training_args)
    except (ValueError, OSError) as error:
        print(f"peft-metal train: error: {error}", file=sys.stderr)
        return 2
    summary = trainer.train(resume=args.resume)
    print(summary)
    return 0


def _has_task_data(command: str) -> bool:
    """Whether the BIG-bench task files are installed; if not, says so (and how to get them) before a model is loaded."""
    from .data import bigbench_root

    try:
        bigbench_root()
    except FileNotFoundError as error:
        print(f"peft-metal {command}: error: {error}", file=sys.stderr)
        return False
    return True


def _launch_training(args: argparse.Namespace) -> int:
    """Run this same `train` command, its arguments unchanged, on `args.processes` processes (accelerate's launcher),
    threads split between them; inside the launch `is_launched()` holds, so each process trains."""
    import subprocess

    from .training.launch import accelerate_command, process_environment

    try:
        command = accelerate_command(["-m", "peft_metal.cli", *args.argv], args.processes)
    except FileNotFoundError as error:
        print(f"peft-metal train: error: {error}", file=sys.stderr)
        return 2
    return subprocess.run(command, env=process_environment(args.processes)).returncode


def _dev_results(paths: Optional[Sequence[str]]) -> Optional[dict[str, float]]:
    """The labelled means of the PGM's own methods (`metal...`; references such as ICL belong to the docs, not to the
    PGM's card) in every results.json given (one per draw of the panel)."""
    from .evaluation.report import labelled_means

    means = {label: mean for path in paths or () for label, mean in labelled_means(path).items()}
    return {label: mean for label, mean in means.items() if label.startswith("metal")} or None


def _card(args: argparse.Namespace) -> int:
    from .pgm import record_dev_results

    try:
        dev_results = _dev_results(args.dev_results)
        if dev_results is None:
            raise ValueError(f"{', '.join(args.dev_results)} hold no results of the PGM's methods (metal...) to record.")
        record_dev_results(args.pgm, dev_results)
    except (ValueError, OSError) as error:
        print(f"peft-metal card: error: {error}", file=sys.stderr)
        return 2
    print(f"Dev results written into {args.pgm}/adapter_config.json and its README.md")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .training.trainer import export_checkpoint

    try:
        target = export_checkpoint(args.run_dir, args.output, args.step, _dev_results(args.dev_results))
    except (ValueError, OSError, KeyError) as error:
        print(f"peft-metal export: error: {error}", file=sys.stderr)
        return 2
    print(f"Exported {args.run_dir} to {target}")
    return 0


def _prompt(args: argparse.Namespace) -> int:
    from .data import load_jsonl_task
    from .metal_prompt import Refinement
    from .precision import cast_frozen_weights

    try:
        shots = [example.as_shot() for example in load_jsonl_task(args.shots).examples]
    except (ValueError, OSError) as error:
        print(f"peft-metal prompt: error: {error}", file=sys.stderr)
        return 2
    model, tokenizer, pgm = _load_pgm(args)
    cast_frozen_weights(model, args.precision)
    try:
        refinement = Refinement(args.refine_steps, args.refine_lr) if args.refine_steps else None
        prompt = model.generate_prompt(
            shots, tokenizer=tokenizer, num_demonstrations=args.num_demonstrations, refinement=refinement
        )
    except (ValueError, TypeError) as error:
        print(f"peft-metal prompt: error: {error}", file=sys.stderr)
        return 2
    if args.output:
        prompt.save(args.output)
        print(f"Saved the prompt to {args.output}", file=sys.stderr)
    if prompt.is_text:
        print(prompt.text + prompt.demonstrations_text, end="")
    else:
        refined = "refined " if prompt.refinement else ""
        print(
            f"This is a {refined}{prompt.design} prompt of {prompt.num_tokens} positions, not text; save it with --output and read it "
            "with GeneratedPrompt.load (or to_prompt_embeds for engines that take embeddings).",
            file=sys.stderr,
        )
    return 0


def _prompt_targets(args: argparse.Namespace) -> int:
    from .precision import cast_frozen_weights
    from .training.prompt_targets import TargetSettings, make_prompt_targets
    from .training.trainer import load_split_tasks

    try:
        settings = TargetSettings(args.pgm, args.shots, args.steps, args.lr, args.batch_size, args.seed)
        tasks = load_split_tasks("train", args.tasks.split(",") if args.tasks else None)
    except (ValueError, FileNotFoundError) as error:
        print(f"peft-metal prompt-targets: error: {error}", file=sys.stderr)
        return 2
    model, tokenizer, _ = _load_pgm(args)
    cast_frozen_weights(model, args.precision)
    try:
        written = make_prompt_targets(model.base_model, tokenizer, tasks, args.output, settings, progress=not args.no_progress)
    except ValueError as error:
        print(f"peft-metal prompt-targets: error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {len(written)} prompt targets to {args.output} ({len(tasks) - len(written)} were there already)")
    return 0


def _load_pgm(args: argparse.Namespace, seed: Optional[int] = None):
    from .pgm import load_pgm

    methods = getattr(args, "methods", "metal")
    warn = any(method.strip().startswith("metal") for method in methods.split(","))
    return load_pgm(args.model, args.pgm, args.device, args.seed if seed is None else seed, warn_untrained=warn)


def _demo(args: argparse.Namespace) -> int:
    from .demo import demo_tasks, run_demo
    from .pgm import load_pgm

    tasks, task_source, seed = demo_tasks(args.seed)
    model, tokenizer, source = load_pgm(args.model, args.pgm, args.device, seed)
    run_demo(model, tokenizer, source or "fresh, untrained PGM", tasks, task_source, args.shots, args.queries, seed,
             args.output)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .data.metaicl import SEEDS as METAICL_SEEDS
    from .evaluation import (
        BaselineOptions,
        EvaluationSettings,
        evaluate_seeds,
        load_eval_tasks,
        markdown_table,
        write_results,
    )
    from .evaluation.panels import METAICL, PANELS, get_panel
    from .evaluation.tasks import load_panel_tasks
    from .precision import cast_frozen_weights

    try:
        panel = get_panel(args.split) if args.split in PANELS else None
        metaicl = args.metaicl is not None or (panel is not None and panel.source == METAICL)
        seeds = _seeds(args.seed, panel.seeds if panel else (METAICL_SEEDS if metaicl else (0,)))
        default_queries = panel.queries if panel else (METAICL_QUERIES if metaicl else 50)
        run = EvaluationSettings(
            args.methods, args.shots, args.queries if args.queries is not None else default_queries,
            num_demonstrations=args.num_demonstrations, max_new_tokens=args.max_new_tokens,
            metric=None if args.metric == "auto" else args.metric, refine_steps=args.refine_steps, refine_lr=args.refine_lr,
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
    model, tokenizer, pgm = _load_pgm(args, seed=seeds[0])
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


def _api_key(args: argparse.Namespace) -> Optional[str]:
    """The key from --api-key-file, else $PEFT_METAL_API_KEY, else None; never from the command line itself."""
    import os

    if args.api_key is not None:
        raise ValueError(
            "--api-key is not accepted: a key on the command line is visible to every user of the machine (ps). "
            "Put it in $PEFT_METAL_API_KEY or in a file passed as --api-key-file."
        )
    if args.api_key_file is not None:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise ValueError(f"cannot read --api-key-file {args.api_key_file}: {error.strerror}") from None
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty.")
        return key
    return os.environ.get("PEFT_METAL_API_KEY") or None


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .precision import cast_frozen_weights
        from .serving.app import create_app
        from .serving.store import PromptStore
    except ModuleNotFoundError as error:
        print(f"peft-metal serve: error: {error}. Serving needs fastapi and uvicorn (pip install fastapi uvicorn).", file=sys.stderr)
        return 2
    if args.max_batch < 1 or args.context_cache_size < 1 or args.batch_window_ms < 0:
        print(
            "peft-metal serve: error: --max-batch and --context-cache-size must be at least 1, --batch-window-ms not "
            "negative.",
            file=sys.stderr,
        )
        return 2
    try:
        store = PromptStore(args.store)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"peft-metal serve: error: cannot open the prompt store {args.store}: {error}", file=sys.stderr)
        return 2
    try:
        api_key = _api_key(args)
    except ValueError as error:
        print(f"peft-metal serve: error: {error}", file=sys.stderr)
        return 2
    if api_key is None and not _is_loopback(args.host):
        print(
            f"peft-metal serve: warning: listening on {args.host} without an API key: anyone who can reach this "
            "address can use the model and the prompt store. Set $PEFT_METAL_API_KEY or pass --api-key-file.",
            file=sys.stderr,
        )
    model, tokenizer, pgm = _load_pgm(args)
    precision = cast_frozen_weights(model, args.precision)
    try:
        app = create_app(
            model, tokenizer, store, api_key=api_key, batch_window_ms=args.batch_window_ms, max_batch=args.max_batch,
            context_cache_size=args.context_cache_size, model_name=args.model, max_body_bytes=args.max_body_bytes,
            max_shots=args.max_shots, max_request_tokens=args.max_request_tokens, max_streams=args.max_streams,
            max_refine_jobs=args.max_refine_jobs,
        )
    except ValueError as error:
        print(f"peft-metal serve: error: {error}", file=sys.stderr)
        return 2
    print(
        f"Serving {args.model} ({precision} weights; PGM: {pgm or 'fresh, untrained'}) with prompts in {args.store}",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .data.metaicl import SEEDS as METAICL_SEEDS
    from .evaluation.panels import PANELS

    parser = argparse.ArgumentParser(prog="peft-metal", description="MetaL-Prompt: meta-learned prompt generation.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="meta-train a PGM on the train families of BIG-bench")
    train.add_argument("--config", required=True, help="a JSON file of TrainingArguments (see examples/)")
    train.add_argument("--output-dir", help="overrides the config's output_dir")
    train.add_argument("--max-steps", type=int, help="overrides the config's max_steps")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    train.add_argument(
        "--init-from", help="start from a saved PGM's weights (continued meta-training; overrides the config's init_from)"
    )
    train.add_argument(
        "--processes", type=int, default=1,
        help="data-parallel processes on this machine (accelerate's launcher; on a CPU one thread each, gradients "
        "over gloo; each process draws its own episodes every step, so halve gradient_accumulation_steps to keep the "
        "episodes per step)",
    )
    train.set_defaults(run=_train)

    export = commands.add_parser(
        "export", help="export a meta-training run's checkpoint as a shippable PGM (padding baked, training facts in "
        "its model card), e.g. to ship what a run that goes on across sessions has so far"
    )
    export.add_argument("--run-dir", required=True, help="the run's output_dir")
    export.add_argument("--step", type=int, help="the checkpoint's step (default: the newest)")
    export.add_argument("--output", required=True, help="folder to write the PGM to")
    export.add_argument("--dev-results", nargs="+", help=DEV_RESULTS_HELP)
    export.set_defaults(run=_export)

    card = commands.add_parser(
        "card", help="put dev results into a saved PGM's config and model card (e.g. after evaluating it on more draws)"
    )
    card.add_argument("--pgm", required=True, help="the saved PGM's folder")
    card.add_argument("--dev-results", nargs="+", required=True, help=DEV_RESULTS_HELP)
    card.set_defaults(run=_card)

    prompt = commands.add_parser(
        "prompt", help="make a task's prompt from shots in a JSONL file; a discrete prompt is printed as text any LM "
        "service can use"
    )
    prompt.add_argument("--shots", required=True, help="JSONL, one {'input', 'output'} record per line")
    prompt.add_argument("--model", default="smollm2-135m", help="smollm2-135m, or a transformers model id or folder")
    prompt.add_argument("--pgm", help="a saved PGM (folder or Hub id); default: the one shipped for --model")
    prompt.add_argument("--num-demonstrations", type=int, default=0, help="shots kept as plain demonstrations (XL)")
    prompt.add_argument(
        "--refine-steps", type=int, default=0,
        help="then refine the prompt by this many Adam steps on the shots the PGM read (default 0: the one pass)",
    )
    prompt.add_argument(
        "--refine-lr", type=float, help="refinement's Adam learning rate (default: refine_prompt's, 5e-2)"
    )
    prompt.add_argument("--output", help="also save the prompt as a safetensors file")
    prompt.add_argument("--device", help="e.g. cuda or cpu (default: cuda if available)")
    prompt.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    prompt.add_argument("--seed", type=int, default=0, help="seeds a fresh PGM when none is given (default 0)")
    prompt.set_defaults(run=_prompt, methods="metal")

    targets = commands.add_parser(
        "prompt-targets", help="refine a PGM's prompt for each train task once, as regression targets for meta-training "
        "(TrainingArguments.prompt_targets); a killed run continues where it stopped"
    )
    targets.add_argument("--pgm", required=True, help="the saved PGM whose prompts are refined (the run's init_from)")
    targets.add_argument("--output", required=True, help="folder of targets, one safetensors prompt per task")
    targets.add_argument("--tasks", help="comma-separated train tasks (default: every task of the train split)")
    targets.add_argument("--model", default="smollm2-135m", help="smollm2-135m, or a transformers model id or folder")
    targets.add_argument("--shots", type=int, default=16, help="shots per task, drawn once (default 16)")
    targets.add_argument("--steps", type=int, default=20, help="refinement steps (default 20)")
    targets.add_argument("--lr", type=float, default=1e-2, help="refinement's Adam learning rate (default 1e-2)")
    targets.add_argument("--batch-size", type=int, default=8, help="shots per refinement step (default 8)")
    targets.add_argument("--seed", type=int, default=0, help="seed of the shot draw and the refinement (default 0)")
    targets.add_argument("--device", help="e.g. cuda or cpu (default: cuda if available)")
    targets.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    targets.add_argument("--no-progress", action="store_true")
    targets.set_defaults(run=_prompt_targets, methods="metal")

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
    evaluation.add_argument("--shots", type=int, default=16, help="k shots per task (default 16)")
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
    evaluation.add_argument("--device", help="e.g. cuda or cpu (default: cuda if available)")
    evaluation.add_argument("--output", default="results.json", help="results JSON; .md and .png are written beside it")
    evaluation.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluation.set_defaults(run=_eval)

    serve = commands.add_parser(
        "serve", help="an HTTP service: prompts generated once and stored, completions read after them, batched"
    )
    serve.add_argument("--model", default="smollm2-135m", help="smollm2-135m, or a transformers model id or folder")
    serve.add_argument(
        "--pgm", help="a saved PGM (folder or Hub id); default: the one shipped for --model, else a fresh untrained one"
    )
    serve.add_argument("--store", required=True, help="the prompt store folder (created if missing)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--api-key-file",
        help="a file holding the key that /v1/* then requires as 'Authorization: Bearer KEY' (default: the key in "
        "$PEFT_METAL_API_KEY, else none)",
    )
    serve.add_argument("--api-key", help=argparse.SUPPRESS)  # refused: a key on the command line shows in `ps`
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit (default 1 MiB)")
    serve.add_argument("--max-shots", type=int, default=512, help="shots per prompt request at most (default 512)")
    serve.add_argument(
        "--max-request-tokens", type=int, default=32768,
        help="tokens one completion request makes the LM read and generate, at most (default 32768)",
    )
    serve.add_argument(
        "--max-streams", type=int, default=16, help="streamed completions open at once at most (default 16; then 429)"
    )
    serve.add_argument(
        "--max-refine-jobs", type=int, default=2,
        help="prompts refined at once at most (refine_steps > 0; default 2; then 429 with Retry-After)",
    )
    serve.add_argument(
        "--batch-window-ms", type=float, default=5.0,
        help="how long the first waiting input of a prompt waits for others to batch with (default 5)",
    )
    serve.add_argument("--max-batch", type=int, default=16, help="inputs per batched LM call at most (default 16)")
    serve.add_argument("--context-cache-size", type=int, default=64, help="prompt contexts kept in memory (default 64)")
    serve.add_argument("--device", help="e.g. cuda or cpu (default: cuda if available)")
    serve.add_argument(
        "--precision", choices=("auto", "fp32", "bf16"), default="auto",
        help="weights of the frozen LM: auto = bf16 on a CPU with AMX / AVX512-BF16 or a bf16 GPU, else fp32",
    )
    serve.add_argument("--seed", type=int, default=0, help="seeds a fresh PGM when none is given (default 0)")
    serve.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    serve.set_defaults(run=_serve, methods="metal")
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
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # `train --processes N` starts the same command again under accelerate's launcher
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
