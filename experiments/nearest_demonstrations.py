"""Do the demonstrations nearest each query beat the last ones? `metal+demos` keeps the task's last 4 shots as
demonstrations for every query; here each query gets instead the 4 shots (of all 16) whose inputs are most like its
own, read after the same context (KATE: Liu et al., "What Makes Good In-Context Examples for GPT-3?", DeeLIO 2022).

    python experiments/nearest_demonstrations.py [--pgm pgms/smollm2-compressed-ce-answers] [--seeds 0,1]
        [--refine-steps 10] [--refine-lr 5e-2] [--name nearest_demonstrations]

Runs, on the dev panel (every query scored after its own context, context tokens averaged over the queries):

* `icl`: all 16 shots (the bar);
* `demos: last` / `demos: nearest`: 4 demonstrations, the task's last 4 shots or each query's 4 nearest;
* with `--pgm`, `metal+demos+refine: last` / `: nearest`: one prompt per task, made and refined exactly as
  `peft-metal eval --methods metal+demos+refine` does (from the first 12 shots, refined on them with the last 4 in
  the context), then read before the last 4 shots or before each query's 4 nearest. Both score the same prompt.

Nearness is the cosine of TF-IDF vectors over the token ids of the formatted inputs (idf over the task's 16 shots):
no model, so no other network is needed at serving. The nearest shot is placed last, next to the query. Dev panel
only; writes `<name>.json` and `.md` under benchmarks/results.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import replace
from typing import Any, Optional, Sequence

import benchmarks_path  # noqa: F401  (benchmarks/ on the path: report.py, timing.py, task_carrying.py)
import torch
from panel_probe import Probe, probe_parser  # experiments/panel_probe.py: what the probes share
from report import write_records_report  # benchmarks/report.py: the JSON + markdown every benchmark leaves

from peft_metal.evaluation.methods import METAL_DEMOS_REFINE, PreparedMethod, encode, prepare_method
from peft_metal.inference import Context, ModelParts, empty_context, extend_context, prompt_context

NUM_DEMONSTRATIONS = 4


def tf_idf(documents: Sequence[Sequence[int]], idf: dict[int, float]) -> list[dict[int, float]]:
    """Each document's unit-length TF-IDF vector over token ids (tokens unseen in the shots weigh nothing)."""
    vectors = []
    for ids in documents:
        weights = {token: count * idf.get(token, 0.0) for token, count in Counter(ids).items()}
        norm = math.sqrt(sum(w * w for w in weights.values())) or 1.0
        vectors.append({token: w / norm for token, w in weights.items()})
    return vectors


def nearest_order(shot_ids: Sequence[Sequence[int]], query_ids: Sequence[int], count: int) -> list[int]:
    """Indices of the `count` shots nearest the query, the nearest last; ties keep the shots' order."""
    documents = len(shot_ids)
    frequency = Counter(token for ids in shot_ids for token in set(ids))
    idf = {token: math.log((1 + documents) / (1 + seen)) + 1.0 for token, seen in frequency.items()}
    *shots, query = tf_idf([*shot_ids, query_ids], idf)
    similarity = [sum(weight * query.get(token, 0.0) for token, weight in shot.items()) for shot in shots]
    ranked = sorted(range(documents), key=lambda i: (-similarity[i], i))[:count]
    return ranked[::-1]


def per_query_demonstrations(name: str, parts: ModelParts, tokenizer, base: Context, base_tokens: int, shots,
                             nearest: bool) -> PreparedMethod:
    """`base` then 4 demonstrations, read again for every query: the last 4 shots or the query's 4 nearest."""
    pairs = [example.as_shot() for example in shots]
    inputs = [encode(tokenizer, parts.template.format_query(shot_input)) for shot_input, _ in pairs]
    read_tokens: list[int] = []

    def read_query(query_ids: list[int]) -> Context:
        order = nearest_order(inputs, query_ids, NUM_DEMONSTRATIONS) if nearest else range(
            len(pairs) - NUM_DEMONSTRATIONS, len(pairs))
        demonstrations = encode(tokenizer, parts.template.format_shots([pairs[i] for i in order]))
        read_tokens.append(base_tokens + len(demonstrations))
        return extend_context(parts.lm, base, demonstrations + query_ids)

    return PreparedMethod(name, base, 0.0, base_tokens, read_query=read_query, info={"_read_tokens": read_tokens})


def task_runs(parts: ModelParts, tokenizer, seed: int, shots, refine: Optional[dict[str, Any]]) -> list[PreparedMethod]:
    icl = parts.template.encode_shots([example.as_shot() for example in shots], tokenizer)
    runs = [PreparedMethod("icl", extend_context(parts.lm, empty_context(), icl), 0.0, len(icl))]
    runs += [per_query_demonstrations(f"demos: {kind}", parts, tokenizer, empty_context(), 0, shots, kind == "nearest")
             for kind in ("last", "nearest")]
    if refine is not None:
        with parts.lora_off():
            made = prepare_method(METAL_DEMOS_REFINE, parts, tokenizer, shots, NUM_DEMONSTRATIONS, seed=seed, **refine)
        bare = replace(made.prompt, demonstrations=torch.zeros(0, dtype=torch.long), demonstrations_text="")
        context = prompt_context(parts.lm, bare)
        runs += [per_query_demonstrations(f"metal+demos+refine: {kind}", parts, tokenizer, context,
                                          bare.context_length, shots, kind == "nearest") for kind in ("last", "nearest")]
    return runs


def main() -> None:
    parser = probe_parser(__doc__, "nearest_demonstrations", pgm=None,
                          pgm_help="a PGM folder: adds the metal+demos+refine runs")
    args = parser.parse_args()
    probe = Probe.load(args, warn_untrained=False)
    refine = None if args.pgm is None else {"refine_steps": args.refine_steps, "refine_lr": args.refine_lr}
    started = time.perf_counter()
    with torch.no_grad():
        records = probe.records(args.queries, lambda parts, seed, shots: task_runs(parts, probe.tokenizer, seed, shots,
                                                                                  refine))
    caption = (
        f"{probe.panel(args.queries)} with {NUM_DEMONSTRATIONS} demonstrations per query: the task's last shots or the "
        f"query's nearest (TF-IDF over input token ids); PGM {probe.source if refine else 'none'}"
        + (f", refined {args.refine_steps} steps at {args.refine_lr}" if refine else "")
        + f"; {probe.machine(time.perf_counter() - started)}. Context tokens: mean over queries of what precedes each "
        "query."
    )
    write_records_report(args.output, args.name, caption, records, precision=probe.precision)


if __name__ == "__main__":
    main()
