"""lm-evaluation-harness model `metal`: the harness's tasks, scored after one MetaL-Prompt prompt per task.

    python -m peft_metal.integrations.lm_eval --model metal \\
        --model_args pretrained=smollm2-135m,metal_shots=16 --tasks TASKS [--include_path DIR]

(lm-eval 0.4 finds models only in its own registry, not through package entry points, so `lm_eval --model metal`
works in a process that has imported this module: the command above is lm-eval's own CLI after that import; in Python,
import this module before `lm_eval.simple_evaluate(model="metal", ...)`.)

For each task, the PGM reads `metal_shots` of that task's few-shot examples and generates one prompt; every request of
the task is then read by the frozen LM as [prompt][request context] and answered by the project's own scoring, so the
harness's `acc` and `acc_norm` are computed from the same log-likelihoods `peft-metal eval` uses.

Model args: `pretrained` (base model: `smollm2-135m` or a transformers id or folder), `pgm` (PGM folder; default the
one shipped for the base model), `metal_shots` (16), `num_demonstrations` (0; the last d shots are kept as plain
demonstrations after the prompt, as `metal+demos`), `refine_steps` (0; then the prompt is refined by that many steps
on the shots the PGM read, as `metal+refine` / `metal+demos+refine`), `refine_lr` (refine_prompt's default), `shot_seed`
(0), `precision` (auto/fp32/bf16 frozen weights, as
`peft-metal eval --precision`), `device`, `include_path` (the folder of the tasks' YAML when they are not lm-eval's
own: see `MetalLM.task`), `max_gen_toks` (256). lm-eval's `batch_size` is accepted and not used: the options of one
request context are always scored together in one batch.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Optional, Sequence

import lm_eval.models  # noqa: F401  (the harness's own models: registered first, see the end of this module)
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry
from lm_eval.api.task import Task
from tqdm.auto import tqdm

from ..data import Example

# The project's reading and scoring, imported in this one place only.
from ..evaluation.methods import (
    METAL,
    METAL_DEMOS,
    METAL_DEMOS_REFINE,
    METAL_REFINE,
    PreparedMethod,
    encode,
    prepare_method,
)
from ..inference import (
    Context,
    ContinuationScore,
    ModelParts,
    Sampling,
    eos_token_ids,
    extend_context,
    generate,
    score_options,
)
from ..metal_prompt import Refinement
from ..pgm import load_pgm
from ..precision import cast_frozen_weights

logger = logging.getLogger(__name__)

MODEL_NAME = "metal"
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generate_until


def _eval_split(task: Task) -> Optional[str]:
    """The split lm-eval evaluates: test if the task has one, else validation."""
    return task.config.test_split if task.has_test_docs() else task.config.validation_split


def _shot_split(task: Task) -> Optional[str]:
    """The split `task.fewshot_docs()` draws from (None for a fixed list of samples), following lm-eval's order:
    the configured few-shot split, else training, else validation, else test."""
    fewshot = task.config.fewshot_config
    if fewshot is not None and getattr(fewshot, "split", None) is not None:
        return fewshot.split
    if fewshot is not None and getattr(fewshot, "samples", None) is not None:
        return None
    if task.has_training_docs():
        return task.config.training_split
    return task.config.validation_split if task.has_validation_docs() else task.config.test_split


def task_shots(task: Task, k: int, seed: int) -> list[Example]:
    """`k` (input, output) shots for the PGM, drawn with `random.Random(seed)` from the task's few-shot examples.

    The source is lm-eval's own for the task's in-context demonstrations, `task.fewshot_docs()` (the configured
    `fewshot_split` or samples, else the training split, else validation), each doc as `doc_to_text` and its target
    (the gold choice's text for multiple choice). Never the evaluated docs: a task whose few-shot examples would come
    from the split it is evaluated on is refused, because the PGM would then read the answers it is scored on.
    """
    split = _shot_split(task)
    if split is not None and split == _eval_split(task):
        raise ValueError(
            f"Task {task.config.task!r} has no few-shot examples apart from the {split!r} split it is evaluated on; "
            "give it a training or fewshot_split for the PGM to read."
        )
    docs = list(task.fewshot_docs())
    if len(docs) < k:
        raise ValueError(
            f"Task {task.config.task!r} has {len(docs)} few-shot examples; metal_shots={k} asks for more."
        )
    return [_shot(task, doc) for doc in random.Random(seed).sample(docs, k)]


def _shot(task: Task, doc: dict) -> Example:
    text = task.doc_to_text(doc)
    if not isinstance(text, str):
        raise ValueError(
            f"Task {task.config.task!r} has several inputs per doc (multiple_input), which metal cannot read."
        )
    target = task.doc_to_target(doc)
    if isinstance(target, list):
        target = target[0]
    if isinstance(target, int) and task.OUTPUT_TYPE == "multiple_choice":
        target = task.doc_to_choice(doc)[target]
    return Example(text, str(target))


class MetalLM(LM):
    """The frozen LM reading a PGM's prompt for each task before every request of it (see the module docstring)."""

    def __init__(
        self,
        pretrained: str = "smollm2-135m",
        pgm: Optional[str] = None,
        metal_shots: int = 16,
        num_demonstrations: int = 0,
        refine_steps: int = 0,
        refine_lr: Optional[float] = None,
        shot_seed: int = 0,
        precision: str = "auto",
        device: Optional[str] = None,
        include_path: Optional[str] = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        batch_size: Any = None,
        max_batch_size: Any = None,
    ) -> None:
        super().__init__()
        if not 0 <= num_demonstrations < metal_shots:
            raise ValueError(f"num_demonstrations={num_demonstrations} must be in [0, metal_shots={metal_shots}).")
        if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI asks for cuda:0 unless told otherwise; its HF model falls back the same way.
            logger.warning("Device %s asked for, but CUDA is not available: running on the CPU.", device)
            device = "cpu"
        model, self.tokenizer, self.pgm_source = load_pgm(pretrained, pgm, device)
        self.precision = cast_frozen_weights(model, precision)
        self.parts = ModelParts.from_model(model)
        if self.parts.tuner is None:
            raise TypeError(f"{pretrained!r} with pgm={pgm!r} did not load a MetaL-Prompt PGM.")
        self.pretrained = pretrained
        self.metal_shots, self.num_demonstrations, self.shot_seed = metal_shots, num_demonstrations, shot_seed
        self.refinement = Refinement(refine_steps, refine_lr)  # checked here, before any task is read
        self.include_path = include_path
        self.max_gen_toks = max_gen_toks
        self._task_managers: list[Any] = []
        self._prepared: dict[str, PreparedMethod] = {}
        self.prompts: dict[str, Any] = {}  # task name -> GeneratedPrompt, to inspect what each task was scored with

    # Tasks and their prompts.

    def task(self, name: str) -> Task:
        """The lm-eval task `name`, loaded again here: the harness hands models requests, never tasks, and the PGM
        needs the task's few-shot examples. Tasks outside lm-eval's own are found in `include_path` (looked at first,
        alone, so lm-eval's ~15k task configs are only indexed when a name is not there)."""
        from lm_eval.tasks import TaskManager

        if not self._task_managers:
            self._task_managers.append(
                TaskManager(include_path=self.include_path, include_defaults=False)
                if self.include_path
                else TaskManager()
            )
        if name not in self._task_managers[-1].all_tasks and self.include_path and len(self._task_managers) == 1:
            self._task_managers.append(TaskManager(include_path=self.include_path))
        manager = self._task_managers[-1]
        if name not in manager.all_tasks:
            raise ValueError(
                f"Task {name!r} is not among lm-eval's tasks: pass the folder of its YAML as include_path=... in "
                "--model_args as well (metal loads the task again to read its few-shot examples)."
            )
        return manager.load([name])["tasks"][name]

    def prepared(self, task_name: str) -> PreparedMethod:
        """The task's prompt (and demonstrations), read by the LM once and reused for all its requests."""
        if task_name not in self._prepared:
            shots = task_shots(self.task(task_name), self.metal_shots, self.shot_seed)
            refine = self.refinement.steps > 0
            if self.num_demonstrations:
                method = METAL_DEMOS_REFINE if refine else METAL_DEMOS
            else:
                method = METAL_REFINE if refine else METAL
            with self.parts.lora_off(), torch.no_grad():
                prepared = prepare_method(
                    method, self.parts, self.tokenizer, shots, self.num_demonstrations,
                    refine_steps=self.refinement.steps, refine_lr=self.refinement.lr, seed=self.shot_seed,
                )
            self._prepared[task_name] = prepared
            self.prompts[task_name] = prepared.prompt
        return self._prepared[task_name]

    def _context(self, request: Instance, text: str) -> Context:
        """[prompt][text] as the LM has read it. Empty text becomes the tokenizer's BOS (else EOS) token, as lm-eval's
        HF model conditions on one: the prompt alone leaves no next-token logits to score a first token with."""
        ids = encode(self.tokenizer, text)
        if not ids:
            prefix = (
                self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
            )
            if prefix is None:
                raise ValueError(
                    "An empty request context needs a BOS or EOS token to condition on; the tokenizer has neither."
                )
            ids = [prefix]
        return extend_context(self.parts.lm, self.prepared(request.task_name).context, ids)

    # The harness's three request types.

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """log P(continuation | [prompt][context]) and whether greedy decoding gives the continuation; the
        continuations of one context (a question's options) are scored in one batch over that context read once."""
        groups: dict[tuple[str, str], list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault((request.task_name, request.args[0]), []).append(index)
        results: list[Any] = [None] * len(requests)
        with self.parts.lora_off(), torch.no_grad():
            for indices in tqdm(groups.values(), desc="metal loglikelihood", disable=disable_tqdm):
                first = requests[indices[0]]
                context = self._context(first, first.args[0])
                continuations = [encode(self.tokenizer, requests[i].args[1]) for i in indices]
                scores = self._score(context, continuations)
                for index, ids, score in zip(indices, continuations, scores):
                    results[index] = (score.sum_logprob, self._is_greedy(context, ids))
                    self.cache_hook.add_partial("loglikelihood", requests[index].args, results[index])
        return results

    def _score(self, context: Context, continuations: list[list[int]]) -> list[ContinuationScore]:
        """Each continuation's log-likelihood after `context`, which already ends with the request's text."""
        return score_options(self.parts.lm, context, [[]], [continuations])[0]

    def _greedy(self, context: Context, max_new_tokens: int, **sampling: Any) -> list[int]:
        eos = sampling.pop("eos_token_ids", ())
        [generation] = generate(self.parts.lm, context, [[]], [Sampling(max_new_tokens, **sampling)], eos_token_ids=eos)
        return generation.tokens

    def _is_greedy(self, context: Context, ids: Sequence[int]) -> bool:
        """Whether argmax decoding after `context` yields `ids` (stops at the first token that differs)."""
        ids = list(ids)
        return self._greedy(context, len(ids), stop=lambda so_far: so_far != ids[: len(so_far)]) == ids

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """log P(text | [prompt][BOS]) of each whole text. The text is scored in one piece after the prompt, not in
        lm-eval's rolling windows, so a text that does not fit the LM's context after the prompt raises."""
        results = []
        with self.parts.lora_off(), torch.no_grad():
            for request in tqdm(requests, desc="metal loglikelihood_rolling", disable=disable_tqdm):
                (text,) = request.args
                [score] = self._score(self._context(request, ""), [encode(self.tokenizer, text)])
                results.append(score.sum_logprob)
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), score.sum_logprob)
        return results

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding after [prompt][context] (the project's decoding), up to `max_gen_toks` tokens, an EOS
        token, or the first of the request's `until` strings, which is cut off. Sampling is refused: metal decodes
        greedily only."""
        eos = eos_token_ids(self.parts.lm, self.tokenizer)
        results = []
        with self.parts.lora_off(), torch.no_grad():
            for request in tqdm(requests, desc="metal generate_until", disable=disable_tqdm):
                text, gen_kwargs = request.args
                if gen_kwargs.get("do_sample"):
                    raise ValueError("metal decodes greedily: sampling (do_sample=True) is not supported.")
                until = gen_kwargs.get("until") or []
                stops = [until] if isinstance(until, str) else list(until)
                max_new = gen_kwargs.get("max_gen_toks", self.max_gen_toks)

                def stop(tokens: list[int]) -> bool:
                    return any(s in self.tokenizer.decode(tokens) for s in stops)

                tokens = self._greedy(self._context(request, text), max_new, eos_token_ids=eos, stop=stop)
                output = self.tokenizer.decode(tokens, skip_special_tokens=True)
                for s in stops:
                    output = output.split(s, 1)[0]
                results.append(output)
                self.cache_hook.add_partial("generate_until", request.args, output)
        return results

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in the harness's results under `config`."""
        return {
            "pretrained": self.pretrained,
            "pgm": self.pgm_source,
            "metal_shots": self.metal_shots,
            "num_demonstrations": self.num_demonstrations,
            "refine_steps": self.refinement.steps,
            "refine_lr": self.refinement.resolved().lr,
            "shot_seed": self.shot_seed,
            "precision": self.precision,
        }


# A lazy entry ("module:class") rather than the class itself, so that running this file as `__main__` and importing
# it again register the same target instead of two different classes under one name.
model_registry.register(MODEL_NAME, target="peft_metal.integrations.lm_eval:MetalLM")


def main() -> None:
    """lm-eval's CLI, with `metal` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
