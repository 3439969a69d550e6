"""Refine the whole context, not only the prompt: `metal+demos+refine` tunes the K prompt positions and keeps its 4
demonstrations as the LM read them. Here the demonstrations' keys and values are tuned too, started from that
reading (prefix tuning started from the LM's own reading of real shots), with the same steps on the same shots. The
context keeps its length, so the tokens a query reads after do not change.

    python experiments/context_refinement.py [--pgm pgms/smollm2-compressed-ce-answers] [--seeds 0,1]
        [--refine-steps 10] [--refine-lr 5e-2] [--refine-lrs 5e-2] [--after-lrs 5e-3] [--after-steps 5]
        [--name context_refinement]

Runs, on the dev panel (each task's first 12 shots are what the PGM reads and what refinement tunes on, the last 4
the demonstrations, as in `peft-metal eval --methods metal+demos+refine`):

* `metal+demos+refine`: the method as it is (the control; the prompt's positions tuned, the demonstrations fixed);
* `context refined @lr`: the one-pass `metal+demos` context (prompt and demonstrations, as per-layer keys/values)
  tuned as one prefix;
* `demos, context refined @lr`: the 4 demonstrations alone, read by the LM and tuned as a prefix (no PGM: what the
  prompt adds to the same tuning);
* with `--after-lrs`, `refined, then context @lr`: the control's context (its prompt already refined) tuned as one
  prefix for `--after-steps` more steps at a smaller rate, so the demonstrations move less than the prompt did.

`--refine-lrs ''` leaves out the two runs tuned from the one pass.

Dev panel only; writes `<name>.json` and `.md` under benchmarks/results.
"""

from __future__ import annotations

import time
from typing import Sequence

import benchmarks_path  # noqa: F401  (benchmarks/ on the path: report.py, timing.py, task_carrying.py)
import torch
from panel_probe import Probe, probe_parser  # experiments/panel_probe.py: what the probes share
from report import write_records_report  # benchmarks/report.py: the JSON + markdown every benchmark leaves

from peft_metal.evaluation.methods import METAL_DEMOS, METAL_DEMOS_REFINE, PreparedMethod, prepare_method
from peft_metal.inference import Context, ModelParts, empty_context, extend_context, prompt_context
from peft_metal.metal_prompt import GeneratedPrompt
from peft_metal.metal_prompt.refine import refine

NUM_DEMONSTRATIONS = 4


def as_prefix(context: Context, like: GeneratedPrompt) -> GeneratedPrompt:
    """What the LM has read, as a prefix prompt of as many positions (no demonstrations left to read)."""
    keys = torch.stack([layer_keys[0] for layer_keys, _ in context.layers])
    values = torch.stack([layer_values[0] for _, layer_values in context.layers])
    return GeneratedPrompt(design="prefix", num_tokens=context.length, base_fingerprint=like.base_fingerprint,
                           pgm_config=like.pgm_config, keys=keys, values=values)


def refined_context(parts: ModelParts, tokenizer, start: Context, like: GeneratedPrompt, shots, steps: int, lr: float,
                    seed: int) -> tuple[Context, float]:
    began = time.perf_counter()
    prompt = refine(parts.lm, as_prefix(start, like), shots, tokenizer, parts.template, steps, lr, seed=seed)
    return prompt_context(parts.lm, prompt), time.perf_counter() - began


def task_runs(parts: ModelParts, tokenizer, seed: int, shots, steps: int, lr: float, lrs: Sequence[float],
              after_lrs: Sequence[float], after_steps: int) -> list[PreparedMethod]:
    pairs = [example.as_shot() for example in shots]
    read, kept = pairs[: len(pairs) - NUM_DEMONSTRATIONS], pairs[len(pairs) - NUM_DEMONSTRATIONS :]
    with parts.lora_off():
        control = prepare_method(METAL_DEMOS_REFINE, parts, tokenizer, shots, NUM_DEMONSTRATIONS, refine_steps=steps,
                                 refine_lr=lr, seed=seed)
        one_pass = prepare_method(METAL_DEMOS, parts, tokenizer, shots, NUM_DEMONSTRATIONS, seed=seed)
        demonstrations = extend_context(parts.lm, empty_context(), parts.template.encode_shots(kept, tokenizer))
    tunings = [(f"{name} @{rate:g}", start, steps, rate) for rate in lrs
               for name, start in (("context refined", one_pass.context), ("demos, context refined", demonstrations))]
    tunings += [(f"refined, then context @{rate:g}", control.context, after_steps, rate) for rate in after_lrs]
    runs = [control]
    for name, start, tuning_steps, rate in tunings:
        with parts.lora_off():
            context, seconds = refined_context(parts, tokenizer, start, one_pass.prompt, read, tuning_steps, rate, seed)
        runs.append(PreparedMethod(name, context, seconds, context.length))
    return runs


def main() -> None:
    parser = probe_parser(__doc__, "context_refinement", refine_lr_help="the control's rate")
    parser.add_argument("--refine-lrs", default="5e-2", help="comma-separated rates of the tunings from the one pass")
    parser.add_argument("--after-lrs", default="", help="comma-separated rates of the tunings after the control")
    parser.add_argument("--after-steps", type=int, default=5)
    args = parser.parse_args()
    lrs = [float(lr) for lr in args.refine_lrs.split(",") if lr]
    after_lrs = [float(lr) for lr in args.after_lrs.split(",") if lr]

    probe = Probe.load(args)
    started = time.perf_counter()
    with torch.no_grad():
        records = probe.records(args.queries, lambda parts, seed, shots: task_runs(
            parts, probe.tokenizer, seed, shots, args.refine_steps, args.refine_lr, lrs, after_lrs, args.after_steps))
    caption = (
        f"{probe.panel(args.queries)}: refinement ({args.refine_steps} Adam steps at {args.refine_lr:g} on the 12 "
        f"shots the PGM read, batches of 8) of the prompt alone (`metal+demos+refine`) or of the whole context, prompt "
        f"and {NUM_DEMONSTRATIONS} demonstrations (`refined, then context`: {args.after_steps} more steps); PGM "
        f"{probe.source}; {probe.machine(time.perf_counter() - started)}. Prompt s: the refinement's seconds."
    )
    write_records_report(args.output, args.name, caption, records, precision=probe.precision)


if __name__ == "__main__":
    main()
