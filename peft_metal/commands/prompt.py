"""`peft-metal prompt`: a task's prompt from shots in a JSONL file; a discrete prompt is printed as text."""

from __future__ import annotations

import argparse
import sys

from .common import load_pgm_for


def add_parser(commands: argparse._SubParsersAction) -> None:
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
    prompt.set_defaults(run=run, methods="metal")


def run(args: argparse.Namespace) -> int:
    from ..data import load_jsonl_task
    from ..metal_prompt import Refinement
    from ..precision import cast_frozen_weights

    try:
        shots = [example.as_shot() for example in load_jsonl_task(args.shots).examples]
    except (ValueError, OSError) as error:
        print(f"peft-metal prompt: error: {error}", file=sys.stderr)
        return 2
    model, tokenizer, pgm = load_pgm_for(args)
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
