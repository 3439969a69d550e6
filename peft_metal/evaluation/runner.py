"""`evaluate`: every method on every task, with the same seeded shots and queries, as one list of records.

Multiple-choice tasks are scored by the log-likelihood of each option's continuation `template.format_answer(option)`
after the query. Each record carries accuracy by three choice rules, named as lm-evaluation-harness names them (see
`metrics`): `acc` (summed log-likelihood), `acc_norm` (summed log-likelihood over the option's length in characters,
lm-eval's definition) and `acc_per_token` (mean log-likelihood per token). Options differ in length, and the summed
log-likelihood drops with every extra token, so the sum favours short options whatever they say; both normalizations
take that bias out. The headline `score` (and `metric`) is `acc_per_token`, the rule meta-training and serving use.

Generative tasks are decoded greedily from the same cached context (up to `max_new_tokens`, cut at the template's shot
separator or a newline) and scored by `exact_match` (the headline `score`) and `token_f1` against any of the example's
answers, after lower-casing and removing punctuation and extra whitespace.

Every metric has its standard error beside it (`acc_stderr`, ...), computed as lm-eval computes it.

`metal+refine` gives one record per refinement step count (`refine_steps` may be a list: accuracy against steps),
each with a `refine_steps` field; the PEFT baselines add `train_steps` (and their first/last minibatch loss).

With `calibration="shots"` a multiple-choice record also carries `acc_calibrated` and `macro_f1_calibrated`: the
picks after dividing out the option prior the method's context gives the task's own shots (`calibration`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..data import Example, Task
from ..data.task import GENERATIVE, MULTIPLE_CHOICE
from ..inference import (
    ContinuationScore,
    ModelParts,
    Sampling,
    cut_generation,
    eos_token_ids,
    generate,
    has_stop,
    model_device,
    score_options,
)
from ..inference.calibration import calibrated_pick, option_prior
from .baselines import BaselineOptions
from .methods import (
    DEFAULT_NUM_DEMONSTRATIONS,
    PreparedMethod,
    option_ids,
    prepare_method,
    query_input,
)
from .metrics import (
    ACC_CALIBRATED,
    CALIBRATION_NOTE,
    CHOICE_RULE_OF_PREDICTIONS,
    MACRO_F1,
    MACRO_F1_CALIBRATED,
    choices,
    exact_match,
    macro_f1,
    mean_stderr,
    token_f1,
)
from .settings import DEFAULT_MAX_NEW_TOKENS, METRICS, EvaluationSettings
from .timing import synchronize

logger = logging.getLogger(__name__)

# The metric each kind of task reports as its `score`.
HEADLINE = {MULTIPLE_CHOICE: "acc_per_token", GENERATIVE: "exact_match"}


def task_metric(task: Task, metric: Optional[str] = None) -> str:
    """The metric to score `task` with: its own (`task.metric`) by default; multiple choice only if it has options."""
    if metric is None:
        return task.metric
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; expected one of {list(METRICS)} (or None for the task's own).")
    if metric == MULTIPLE_CHOICE and task.metric != MULTIPLE_CHOICE:
        missing = sum(example.options is None for example in task.examples)
        raise ValueError(
            f"Task {task.name!r} cannot be scored as multiple choice: {missing} of its {len(task.examples)} examples "
            f"have no options. Score it as {GENERATIVE!r} instead."
        )
    return metric


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _option_scores(parts, tokenizer, prepared: PreparedMethod, example: Example, role: str) -> list[ContinuationScore]:
    """Every option of `example` scored after the method's context and the example's input."""
    if example.options is None:
        raise ValueError(f"{role.capitalize()} {example.input!r} has no options to score as multiple choice.")
    context, query = query_input(parts, tokenizer, prepared, example.input)
    return score_options(parts.lm, context, [query], [option_ids(parts, tokenizer, example.options)])[0]


def _score_multiple_choice(
    parts, tokenizer, prepared: PreparedMethod, queries: Sequence[Example],
    calibration_shots: Optional[Sequence[Example]] = None,
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Per choice rule, whether each query's pick is an answer; and the macro-F1 of the `acc_per_token` picks. With
    `calibration_shots`, also the picks calibrated by the option prior read on those shots (`calibration`), or, for a
    task whose queries offer options no shot offers (distractors drawn per question), a note saying why it cannot."""
    prior, draw_metrics = None, {}
    if calibration_shots is not None:
        prior = option_prior([
            (shot.options, [score.mean_logprob for score in _option_scores(parts, tokenizer, prepared, shot, "shot")])
            for shot in calibration_shots
        ])
        uncovered = sorted({option for example in queries for option in example.options or ()} - set(prior))
        if uncovered:
            prior, draw_metrics[CALIBRATION_NOTE] = None, (
                f"not applicable: {len(uncovered)} options offered by queries are offered by none of the shots "
                f"(e.g. {uncovered[:3]}), so the shots give them no prior"
            )
    hits: dict[str, list[float]] = {}
    predictions, calibrated = [], []
    for example in queries:
        scores = _option_scores(parts, tokenizer, prepared, example, "query")
        mean_logprobs = [score.mean_logprob for score in scores]
        picks = choices(example.options, [score.sum_logprob for score in scores], mean_logprobs)
        if prior is not None:
            picks[ACC_CALIBRATED] = calibrated_pick(example.options, mean_logprobs, prior)
            calibrated.append(picks[ACC_CALIBRATED])
        for name, pick in picks.items():
            hits.setdefault(name, []).append(float(pick in example.answers))
        predictions.append(picks[CHOICE_RULE_OF_PREDICTIONS])
    golds = [example.output for example in queries]
    draw_metrics[MACRO_F1] = macro_f1(predictions, golds)
    if prior is not None:
        draw_metrics[MACRO_F1_CALIBRATED] = macro_f1(calibrated, golds)
    return hits, draw_metrics


def _score_generative(
    parts, tokenizer, prepared: PreparedMethod, queries: Sequence[Example], max_new_tokens: int
) -> dict[str, list[float]]:
    eos = eos_token_ids(parts.lm, tokenizer)
    template = parts.template

    def stop(tokens: list[int]) -> bool:
        return has_stop(tokenizer.decode(tokens), template)

    values: dict[str, list[float]] = {"exact_match": [], "token_f1": []}
    for example in queries:
        context, query = query_input(parts, tokenizer, prepared, example.input)
        [generation] = generate(parts.lm, context, [query], [Sampling(max_new_tokens, stop=stop)], eos_token_ids=eos)
        tokens = generation.tokens
        answer = cut_generation(tokenizer.decode(tokens, skip_special_tokens=True), template)
        values["exact_match"].append(exact_match(answer, example.answers))
        values["token_f1"].append(token_f1(answer, example.answers))
    return values


def evaluate_method(
    parts: ModelParts,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    method: str,
    shots: Sequence[Example],
    queries: Sequence[Example],
    metric: str,
    num_demonstrations: int = DEFAULT_NUM_DEMONSTRATIONS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    calibration: str = "none",
    **method_options: Any,
) -> dict[str, Any]:
    """One record: `method` on `task`'s queries, given its shots (`method_options`: see `prepare_method`); with
    `calibration="shots"`, also the picks calibrated on those shots (or a note saying why they cannot be)."""
    start = time.perf_counter()
    prepared = prepare_method(method, parts, tokenizer, shots, num_demonstrations, **method_options)
    setup_seconds = time.perf_counter() - start - prepared.prompt_seconds  # e.g. ICL reading its demonstrations
    calibration_shots = shots if calibration == "shots" else None
    record = evaluate_prepared(parts, tokenizer, task, prepared, queries, metric, max_new_tokens, calibration_shots)
    record["eval_seconds"] += setup_seconds
    return record


def evaluate_prepared(
    parts: ModelParts,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    prepared: PreparedMethod,
    queries: Sequence[Example],
    metric: str,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    calibration_shots: Optional[Sequence[Example]] = None,
) -> dict[str, Any]:
    """One record: `task`'s queries scored after a context already set up (by `prepare_method`, or by a benchmark
    that builds its own, e.g. a pruned cache), as every method is scored; with `calibration_shots`, also the picks
    calibrated from them (`calibration`), or a `calibration` note saying why they cannot be."""
    start = time.perf_counter()
    draw_metrics = {}
    if metric == MULTIPLE_CHOICE:
        values, draw_metrics = _score_multiple_choice(parts, tokenizer, prepared, queries, calibration_shots)
    else:
        values = _score_generative(parts, tokenizer, prepared, queries, max_new_tokens)
        if calibration_shots is not None:
            draw_metrics[CALIBRATION_NOTE] = (
                f"not applicable: calibration calibrates a choice among options, and the task is scored as {metric}"
            )
    synchronize(model_device(parts.lm))
    record = {
        "task": task.name,
        "method": prepared.name,
        "metric": HEADLINE[metric],
        "score": None,
        "n": len(queries),
        "prompt_seconds": prepared.prompt_seconds,
        "context_tokens": prepared.context_tokens,
        "eval_seconds": time.perf_counter() - start,
    }
    for name, per_query in values.items():
        record[name], record[f"{name}_stderr"] = mean_stderr(per_query)
    record.update(draw_metrics)
    record["score"] = record[HEADLINE[metric]]
    record.update(prepared.info or {})
    return record


def _warm_up_pgm(parts: ModelParts, tokenizer: PreTrainedTokenizerBase) -> None:
    """One untimed PGM pass, so the first task's `prompt_seconds` measures making a prompt, not the process's one-time
    start-up work on the PGM path (first LoRA pass, allocator growth), which would otherwise be charged to it alone."""
    parts.tuner.generate_prompt([("warm-up", "done")], tokenizer=tokenizer)


def _error_record(task_name: str, method: str, error: Exception, **fields: Any) -> dict[str, Any]:
    return {"task": task_name, "method": method, **fields, "error": f"{type(error).__name__}: {error}"}


def evaluate(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[Task],
    methods: Any,
    shots: int,
    queries: int,
    seed: int,
    progress: bool = True,
    *,
    raise_errors: Optional[bool] = None,
    baseline_steps: Optional[int] = None,
    baseline_options: Optional[BaselineOptions] = None,
    **settings: Any,
) -> list[dict[str, Any]]:
    """Score every method on every task; every method sees the same `task.split(shots, queries, seed)`.

    Multiple-choice tasks are scored by option log-likelihood (`acc`, `acc_norm`, `acc_per_token`; `score` is
    `acc_per_token`), generative tasks by greedy decoding (`exact_match`, which is `score`, and `token_f1`), each
    metric with its `_stderr` (see `metrics`). `settings` are `EvaluationSettings`' other fields
    (`num_demonstrations`, `max_new_tokens`, `metric`, `refine_steps`, `refine_lr`, `refine_batch_size`); the PEFT
    baselines train `baseline_steps` steps (default `baseline_options.steps`, 50) with `baseline_options`.

    Bad arguments raise at once. A task or method that fails is raised when `raise_errors` is true (the default for a
    single task) and otherwise recorded as `{"task", "method", "error"}` while the run goes on (the default for
    several tasks).
    """
    baseline = baseline_options if baseline_options is not None else BaselineOptions()
    if baseline_steps is not None:
        if not isinstance(baseline, BaselineOptions):
            raise TypeError(f"baseline_options must be a BaselineOptions, got {type(baseline).__name__}.")
        baseline = dataclasses.replace(baseline, steps=baseline_steps)  # validated by the options
    run_settings = EvaluationSettings(methods, shots, queries, baseline=baseline, **settings)
    return run_evaluation(model, tokenizer, tasks, run_settings, seed, progress, raise_errors)


def run_evaluation(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[Task],
    settings: EvaluationSettings,
    seed: int,
    progress: bool = True,
    raise_errors: Optional[bool] = None,
) -> list[dict[str, Any]]:
    """`evaluate` with its settings already checked (`EvaluationSettings`)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"tokenizer must be the base model's tokenizer, got {type(tokenizer).__name__}.")
    parts = ModelParts.from_model(model)
    if settings.pgm_methods and parts.tuner is None:
        raise TypeError(f"Methods {list(settings.pgm_methods)} need a MetaL-Prompt PGM; got a plain {type(model).__name__}.")
    tasks = list(tasks)
    if not tasks:
        raise ValueError("No tasks to evaluate.")
    for task in tasks:
        if not isinstance(task, Task):
            raise TypeError(f"tasks must hold Task objects, got {type(task).__name__}.")
    if raise_errors is None:
        raise_errors = len(tasks) == 1

    runs = settings.runs
    results: list[dict[str, Any]] = []
    options = dict(
        baseline=settings.baseline, refine_lr=settings.refine_lr, refine_batch_size=settings.refine_batch_size, seed=seed
    )
    bar = tqdm(total=len(tasks) * len(runs), desc="eval", unit="run", disable=not progress)
    with _eval_mode(model), parts.lora_off(), torch.no_grad(), bar:
        if settings.pgm_methods:
            _warm_up_pgm(parts, tokenizer)
        for task in tasks:
            try:
                metric_name = task_metric(task, settings.metric)
                task_shots, task_queries = task.split(settings.shots, settings.queries, seed)
            except Exception as error:  # noqa: BLE001 - recorded, the run goes on
                if raise_errors:
                    raise
                logger.warning("Task %s failed: %s", task.name, error)
                results.extend(_error_record(task.name, method, error, **fields) for method, fields in runs)
                bar.update(len(runs))
                continue
            for method, fields in runs:
                bar.set_postfix_str(f"{task.name} / {method}", refresh=False)
                try:
                    record = evaluate_method(
                        parts, tokenizer, task, method, task_shots, task_queries, metric_name,
                        num_demonstrations=settings.num_demonstrations, max_new_tokens=settings.max_new_tokens,
                        calibration=settings.calibration, **options, **fields,
                    )
                except Exception as error:  # noqa: BLE001 - recorded, the run goes on
                    if raise_errors:
                        raise
                    logger.warning("Task %s, method %s failed: %s", task.name, method, error)
                    record = _error_record(task.name, method, error, **fields)
                results.append(record)
                bar.update(1)
    return results


def evaluate_seeds(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[Task],
    settings: EvaluationSettings,
    seeds: Sequence[int],
    progress: bool = True,
) -> list[dict[str, Any]]:
    """`run_evaluation` once per seed; with several seeds, one record per task and method merged over them
    (`merge_seeds`), with one seed the records as they are, tagged with it."""
    from .report import merge_seeds

    records = []
    for seed in seeds:
        records += [dict(record, seed=seed) for record in run_evaluation(model, tokenizer, tasks, settings, seed, progress)]
    return merge_seeds(records) if len(seeds) > 1 else records
