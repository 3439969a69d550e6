"""Refined prompts as regression targets for meta-training.

On the dev panel, 20 refinement steps (`refine_prompt`) from the meta-trained PGM's one-pass prompt reach ICL-16,
while the one pass alone carries only the generic part of what ICL gains (docs/research-log.md). A PGM meta-trained on
cross-entropy alone has not learnt that mapping; these targets spell it out. For each train task, one prompt is
generated from a fixed draw of its shots and refined on them, once, before the run (`make_prompt_targets`,
`peft-metal prompt-targets`); every episode of that task then adds ||prompt(XP) - target||^2 / ||target||^2 over the
tensors the LM reads (`prompt_target_loss`), so the PGM learns to produce, in one pass, what refinement would reach.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data import Task
from ..designs import get_design
from ..metal_prompt.fingerprint import check_same_base
from ..metal_prompt.prompt import GeneratedPrompt
from ..metal_prompt.refine import Refinement

MANIFEST = "targets.json"


@dataclass(frozen=True)
class TargetSettings:
    """How every target of a folder was made; a folder holds targets of one setting only."""

    pgm: str
    shots: int = 16
    steps: int = 20
    lr: float = 1e-2
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        # checked before a folder records them: a bad value must not leave a manifest that refuses the corrected one
        if self.shots < 1:
            raise ValueError(f"prompt targets need shots >= 1, got {self.shots}.")
        self.refinement()  # the refinement's own checks

    def refinement(self) -> Refinement:
        """The refinement that makes each target from the PGM's prompt."""
        return Refinement(self.steps, self.lr, self.batch_size, self.seed)


def target_path(directory: str | os.PathLike, task_name: str) -> Path:
    """Where a task's target lives: one safetensors prompt file per task (`family/subtask` -> `family__subtask`)."""
    return Path(directory) / f"{task_name.replace('/', '__')}.safetensors"


def make_prompt_targets(
    tuner,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Iterable[Task],
    directory: str | os.PathLike,
    settings: TargetSettings,
    progress: bool = True,
) -> list[str]:
    """Write a refined prompt per task into `directory` and return the names written now.

    Tasks whose file exists are skipped, so a killed run continues where it stopped; a folder made with other
    settings is refused, so one run's targets never mix two recipes. `tuner` is the MetaLPromptModel
    (`peft_model.base_model`).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = directory / MANIFEST
    wanted = asdict(settings)
    if manifest.exists():
        found = json.loads(manifest.read_text())
        if found != wanted:
            raise ValueError(
                f"{directory} holds prompt targets made with {found}, not {wanted}: use another folder, or the same "
                "settings to continue it."
            )
    else:
        manifest.write_text(json.dumps(wanted, indent=1) + "\n")
    written = []
    tasks = list(tasks)
    for task in tqdm(tasks, desc="prompt targets", disable=not progress):
        path = target_path(directory, task.name)
        if path.exists():
            continue
        shots, _ = task.split(settings.shots, 0, settings.seed)
        pairs = [example.as_shot() for example in shots]
        refinement = settings.refinement()
        with torch.no_grad():
            refined = tuner.generate_prompt(pairs, tokenizer=tokenizer, chunk_size="auto", refinement=refinement)
        partial = path.with_name(path.name + ".partial")  # renamed when complete: a kill leaves no half target
        refined.save(partial)
        os.replace(partial, path)
        written.append(task.name)
    return written


def load_prompt_targets(
    directory: str | os.PathLike, task_names: Iterable[str], tuner
) -> dict[str, dict[str, torch.Tensor]]:
    """The targets of `task_names` as the tensors the LM reads (float32), checked against the PGM they will train.

    A task without a target, or a target of another design, K or base model, raises with both values named.
    """
    config = tuner.metal_config
    lm: PreTrainedModel = tuner.model
    missing = [name for name in task_names if not target_path(directory, name).exists()]
    if missing:
        raise ValueError(
            f"{directory} has no prompt target for {len(missing)} train task(s), e.g. {missing[:3]}: make them with "
            "`peft-metal prompt-targets`, or restrict the run's `tasks` to those with targets."
        )
    targets = {}
    for name in task_names:
        path = target_path(directory, name)
        prompt = GeneratedPrompt.load(path)
        if (prompt.design, prompt.num_tokens) != (config.prompt_design, config.num_prompt_tokens):
            raise ValueError(
                f"{path} is a {prompt.design} prompt of {prompt.num_tokens} positions; the PGM makes "
                f"{config.prompt_design} prompts of {config.num_prompt_tokens}. Make targets with this PGM's settings."
            )
        check_same_base(prompt.base_fingerprint, tuner.base_fingerprint())
        payload = get_design(prompt.design).tunable_payload(prompt, lm)
        targets[name] = {key: tensor.detach().float() for key, tensor in payload.items()}
    return targets


def prompt_target_loss(prompt: GeneratedPrompt, target: Mapping[str, torch.Tensor], lm: PreTrainedModel) -> torch.Tensor:
    """||prompt - target||^2 / ||target||^2 over the tensors the LM reads: 0 at the target, 1 for a zero prompt."""
    payload = get_design(prompt.design).tunable_payload(prompt, lm)
    error = sum(((payload[name].float() - tensor.to(payload[name].device)) ** 2).sum() for name, tensor in target.items())
    scale = sum((tensor**2).sum() for tensor in target.values())
    return error / scale.to(error.device)
