"""Evaluation of MetaL-Prompt against zero-shot, in-context learning and PEFT prompt-learning baselines (prompt
tuning, p-tuning, prefix tuning trained on the shots) on the same seeded shots and queries.

`evaluate(model, tokenizer, tasks, methods, shots, queries, seed)` returns one record per task and method;
`write_results` writes them as `results.json`, `results.md` and `results.png`. The `peft-metal eval` command runs both.
"""

from .baselines import BASELINE_METHODS, DEFAULT_LRS, BaselineOptions, TrainedBaseline, train_baseline
from .methods import METHODS, prepare_method, resolve_methods
from .metrics import exact_match, normalize_answer, token_f1
from .report import markdown_table, mean_scores, method_label, write_results
from .runner import evaluate, evaluate_seeds, run_evaluation, task_metric
from .settings import EvaluationSettings, resolve_refine_steps
from .tasks import check_eval_task, load_eval_tasks

__all__ = [
    "BASELINE_METHODS",
    "BaselineOptions",
    "DEFAULT_LRS",
    "METHODS",
    "TrainedBaseline",
    "check_eval_task",
    "evaluate",
    "evaluate_seeds",
    "EvaluationSettings",
    "run_evaluation",
    "exact_match",
    "load_eval_tasks",
    "markdown_table",
    "mean_scores",
    "method_label",
    "normalize_answer",
    "prepare_method",
    "resolve_methods",
    "resolve_refine_steps",
    "task_metric",
    "token_f1",
    "train_baseline",
    "write_results",
]
