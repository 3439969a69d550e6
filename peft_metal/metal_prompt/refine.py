"""Gradient refinement of a generated prompt: prompt tuning on the task's own shots, started from the PGM's prompt.

The PGM gives a good start in one forward pass; a few steps of prompt tuning on the same shots can then fit the task
more closely. What is tuned is the prompt itself, as the LM reads it: the embeddings (weighted_sum, hidden_state), every
layer's keys and values (prefix), or, for a discrete prompt, the embeddings of its tokens. A refined discrete prompt
therefore keeps its tokens (and `text`) for reference but is read as its tuned embeddings: it is a soft prompt.
A refined prompt records how it was refined (`GeneratedPrompt.refinement`), in its file too.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..designs import get_design
from .prompt import GeneratedPrompt
from .queries import answer_tokens, encode_queries, split_by_tokens
from .reading import forward_with_prompt, model_device
from .template import Shot, ShotTemplate

# A step's minibatch is read in pieces of at most this many (padded) tokens, gradients summed: the same step, with the
# memory of a graded pass bounded (8 reading-comprehension shots of some 1,500 tokens in one pass took over 15 GB).
MAX_BATCH_TOKENS = 2048
DEFAULT_BATCH_SIZE = 8
# Adam's rate when none is given. Measured on the BIG-bench panel (docs/research-log.md, "Refinement at serving"): a prefix prompt gains in 5
# steps at 5e-2 what 20 steps at 1e-2 gave (0.593 both; 1e-3 barely moves it), a discrete prompt's embeddings in 10
# what 20 at 1e-2 gave (0.544 and 0.551).
DEFAULT_LR = 5e-2


@dataclass(frozen=True)
class Refinement:
    """How `generate_prompt` refines the prompt it makes: `steps` Adam steps at `lr` (None: `DEFAULT_LR`) on
    minibatches of `batch_size` of the shots the PGM read, in an order drawn from `seed`. Its fields are
    `refine_prompt`'s keywords, so callers pass `**asdict(refinement)`."""

    steps: int
    lr: Optional[float] = None
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0

    def __post_init__(self) -> None:
        check_refinement(self.steps, self.lr, self.batch_size)

    def resolved(self) -> "Refinement":
        """The same refinement with the rate it runs at (what a stored prompt's id must name)."""
        return replace(self, lr=resolve_lr(self.lr))


def resolve_lr(lr: Optional[float]) -> float:
    return DEFAULT_LR if lr is None else float(lr)


def check_refinement(steps: int, lr: Optional[float], batch_size: int, max_batch_tokens: int = MAX_BATCH_TOKENS) -> None:
    for name, value in (("steps", steps), ("batch_size", batch_size), ("max_batch_tokens", max_batch_tokens)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"refinement {name} must be an int, got {value!r}.")
    if steps < 0 or batch_size <= 0 or max_batch_tokens <= 0:
        raise ValueError(
            f"refinement needs steps >= 0, batch_size > 0 and max_batch_tokens > 0 (got steps={steps}, "
            f"batch_size={batch_size}, max_batch_tokens={max_batch_tokens})."
        )
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
        raise ValueError(f"refinement lr must be a number > 0, or None for DEFAULT_LR ({DEFAULT_LR}); got {lr!r}.")


def refine(
    lm: PreTrainedModel,
    prompt: GeneratedPrompt,
    shots: list[Shot],
    tokenizer: PreTrainedTokenizerBase,
    template: ShotTemplate,
    steps: int = 10,
    lr: Optional[float] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    progress: Optional[Callable[[int, float], None]] = None,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
    demonstration_shots: Sequence[Shot] = (),
) -> GeneratedPrompt:
    """`steps` Adam steps on -log P_LM(output | prompt, demonstrations, input) over minibatches of `shots`, at `lr`
    (None: `DEFAULT_LR`): `PromptTuning` run to its end.

    With `demonstration_shots` (the prompt's demonstrations, as shots), each step draws as many demonstrations afresh
    from all the shots and its minibatch from the rest: every shot's answer is learnt from (never at a step where it is
    in the context), and the prompt is fitted to no one set of demonstrations. The prompt returned keeps its own
    demonstrations. On the dev panel this scores below refining with the demonstrations it is served with
    (docs/research-log.md, "Demonstrations (`metal+demos`, refined or not)"), so no method uses it; `experiments/rotating_demonstrations.py` does.

    Only the prompt's tensors change (in float32, cast back at the end); the LM is only read. Gradients are on
    whatever the caller's grad mode, since refinement cannot work without them.
    """
    tuning = PromptTuning(
        lm, prompt, shots, tokenizer, template, steps, lr, batch_size, seed, max_batch_tokens, demonstration_shots
    )
    return tuning.run(progress)


class PromptTuning:
    """`refine` one Adam step per `step()` call, so a caller can do other model work between steps (the service
    serves waiting completions); `run()` takes the steps left at once, `result()` is the tuned prompt.

    `reading` is entered around every step (the tuner passes "LoRA off"); it is never held between steps, so whatever
    runs between them sees the model as it was.
    """

    def __init__(
        self,
        lm: PreTrainedModel,
        prompt: GeneratedPrompt,
        shots: list[Shot],
        tokenizer: PreTrainedTokenizerBase,
        template: ShotTemplate,
        steps: int = 10,
        lr: Optional[float] = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        seed: int = 0,
        max_batch_tokens: int = MAX_BATCH_TOKENS,
        demonstration_shots: Sequence[Shot] = (),
        reading: Callable[[], ContextManager[Any]] = nullcontext,
    ) -> None:
        check_refinement(steps, lr, batch_size, max_batch_tokens)
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "Refinement takes gradient steps, which torch.inference_mode() forbids: make or refine the prompt "
                "under torch.no_grad() (refinement turns gradients back on for itself) or outside inference mode."
            )
        if not shots:
            raise ValueError("Refinement needs at least one shot to tune the prompt on.")
        self.lm, self.shots, self.tokenizer, self.template = lm, shots, tokenizer, template
        self.steps, self.lr, self.batch_size, self.seed = steps, resolve_lr(lr), batch_size, seed
        self.max_batch_tokens, self.reading = max_batch_tokens, reading
        self.steps_done = 0
        self._start = prompt.detach()
        self._rotating = (
            _RotatingDemonstrations(shots, demonstration_shots, tokenizer, template) if demonstration_shots else None
        )
        self._record = {"steps": steps, "lr": self.lr, "batch_size": batch_size, "seed": seed, "num_shots": len(shots)}
        if demonstration_shots:
            self._record["rotated_demonstrations"] = len(demonstration_shots)
        payload = get_design(prompt.design).tunable_payload(self._start, lm)
        self._dtypes = {name: tensor.dtype for name, tensor in payload.items()}
        self._parameters = {name: nn.Parameter(tensor.detach().float().clone()) for name, tensor in payload.items()}
        self._optimizer = torch.optim.Adam(self._parameters.values(), lr=self.lr)
        self._order = random.Random(seed)
        self._demonstrations = self._start.demonstrations

    @property
    def done(self) -> bool:
        return self.steps_done >= self.steps

    def step(self) -> float:
        """One Adam step (with gradients on, whatever the caller's grad mode); returns the minibatch's loss."""
        if self.done:
            raise RuntimeError(f"All {self.steps} refinement steps are done: take result().")
        with torch.enable_grad(), self.reading():
            loss = self._step()
        self.steps_done += 1
        return loss

    def run(self, progress: Optional[Callable[[int, float], None]] = None) -> GeneratedPrompt:
        """The steps left, then `result()`; `progress(step, loss)` after each."""
        while not self.done:
            loss = self.step()
            if progress is not None:
                progress(self.steps_done - 1, loss)
        return self.result()

    def result(self) -> GeneratedPrompt:
        """The tuned prompt (cast back to its dtypes), its refinement recorded; only once every step is done."""
        if not self.done:
            raise RuntimeError(f"Refinement is at step {self.steps_done} of {self.steps}: step() until done.")
        tuned = {name: p.detach().to(self._dtypes[name]) for name, p in self._parameters.items()}
        return replace(self._start, refinement=[*self._start.refinement, self._record], **tuned)

    def _step(self) -> float:
        device = model_device(self.lm)
        if self._rotating is None:
            batch_shots = self._order.sample(self.shots, min(self.batch_size, len(self.shots)))
        else:
            batch_shots, self._demonstrations = self._rotating.draw(self._order, self.batch_size, device)
        batch = encode_queries(batch_shots, self.tokenizer, self.template, device)
        total = answer_tokens(batch)
        self._optimizer.zero_grad()
        step_loss = 0.0
        for piece in split_by_tokens(batch, self.max_batch_tokens):
            # each piece's mean loss weighted by its share of the answer tokens: the minibatch's mean, summed in parts
            tuned = {name: p.to(self._dtypes[name]) for name, p in self._parameters.items()}
            candidate = replace(self._start, demonstrations=self._demonstrations, **tuned)
            outputs = forward_with_prompt(self.lm, candidate, piece.input_ids, piece.attention_mask, piece.labels)
            loss = outputs.loss * (answer_tokens(piece) / total)
            loss.backward()
            step_loss += loss.item()
        self._optimizer.step()
        return step_loss


def first_order(start: GeneratedPrompt, refined: GeneratedPrompt, lm: PreTrainedModel) -> GeneratedPrompt:
    """`refined`, written as `start` plus the shift refinement made, the shift held constant: first-order MAML.

    A loss read after the result has the refined prompt's value and passes its gradient straight to whatever made
    `start` (the PGM), so meta-training can ask for a start that refinement takes furthest, without differentiating
    through the refinement steps themselves.
    """
    design = get_design(start.design)
    before = design.tunable_payload(start, lm)
    after = design.tunable_payload(refined, lm)
    shifted = {name: tensor + (after[name].to(tensor.dtype) - tensor).detach() for name, tensor in before.items()}
    return replace(start, **shifted)


class _RotatingDemonstrations:
    """Each step's demonstrations and minibatch: `len(demonstrations)` of all the shots drawn as demonstrations, the
    minibatch from the others."""

    def __init__(
        self, shots: Sequence[Shot], demonstrations: Sequence[Shot], tokenizer: PreTrainedTokenizerBase, template: ShotTemplate
    ) -> None:
        self.pool = [*shots, *demonstrations]
        self.num_demonstrations = len(demonstrations)
        self.tokenizer = tokenizer
        self.template = template
        if len(self.pool) <= self.num_demonstrations:
            raise ValueError("Rotating demonstrations needs at least one shot besides them to tune the prompt on.")

    def draw(self, order: random.Random, batch_size: int, device: torch.device) -> tuple[list[Shot], torch.Tensor]:
        drawn = order.sample(range(len(self.pool)), len(self.pool))
        demonstrations = [self.pool[i] for i in drawn[: self.num_demonstrations]]
        rest = [self.pool[i] for i in drawn[self.num_demonstrations :]]
        ids = self.template.encode_shots(demonstrations, self.tokenizer)
        return rest[:batch_size], torch.tensor(ids, dtype=torch.long, device=device)

