"""Evaluation of MetaL-Prompt against zero-shot, in-context learning and PEFT prompt-learning baselines (prompt
tuning, p-tuning, prefix tuning trained on the shots) on the same seeded shots and queries.

`evaluate(model, tokenizer, tasks, methods, shots, queries, seed)` returns one record per task and method;
`write_results` writes them as `results.json`, `results.md` and `results.png`. The `peft-metal eval` command runs both.
"""

from .baselines import BASELINE_METHODS, DEFAULT_LRS, BaselineOptions, TrainedBaseline, train_baseline
from .methods import METHODS, ModelParts, prepare_method, resolve_methods
from .metrics import cut_generation, exact_match, normalize_answer, token_f1
from .report import markdown_table, mean_scores, method_label, write_results
from .runner import evaluate, evaluate_seeds, resolve_refine_steps, task_metric
from .scoring import (
    Context,
    ContinuationScore,
    empty_context,
    extend_context,
    greedy_decode,
    prompt_context,
    score_continuations,
)
from .tasks import check_eval_task, load_eval_tasks

__all__ = [
    "BASELINE_METHODS",
    "BaselineOptions",
    "DEFAULT_LRS",
    "METHODS",
    "TrainedBaseline",
    "Context",
    "ContinuationScore",
    "ModelParts",
    "check_eval_task",
    "cut_generation",
    "empty_context",
    "evaluate",
    "evaluate_seeds",
    "exact_match",
    "extend_context",
    "greedy_decode",
    "load_eval_tasks",
    "markdown_table",
    "mean_scores",
    "method_label",
    "normalize_answer",
    "prepare_method",
    "prompt_context",
    "resolve_methods",
    "resolve_refine_steps",
    "score_continuations",
    "task_metric",
    "token_f1",
    "train_baseline",
    "write_results",
]
