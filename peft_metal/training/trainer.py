"""Meta-training of a PGM over many tasks, on `accelerate`.

One process on CPU or GPU by default; the same code runs under `accelerate launch` on several processes, GPUs or not
(each process draws its own episode stream and checkpoints its own position). bf16 where the hardware multiplies it
fast (frozen weights cast once on a CPU, autocast on a GPU), an optional generic-text first stage, gradient
accumulation, warmup + cosine schedule over `max_steps` optimizer steps, resumable checkpoints, periodic dev loss, a
progress bar and a JSONL log.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from peft import PeftConfig
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..base_models import load_base_model
from ..data import EpisodeSampler, Task, check_allowed, load_bigbench_tasks, tasks_for_split
from ..data.metaicl import check_metaicl_split, load_metaicl_pool, load_metaicl_splits
from ..data.text import MIN_CONTINUATION_TOKENS, TextEpisode, TextSampler
from ..metal_prompt import MetaLPromptConfig
from ..metal_prompt.graded_pass import BucketTooSmallError, GradedPass, why_not_compiled
from ..metal_prompt.model import PADDING_ATTRIBUTE
from ..metal_prompt.reading import max_context_length
from ..pgm import attach_pgm, check_pgm_folder, get_peft_model
from ..precision import cast_frozen_weights, resolve_precision
from .arguments import TrainingArguments
from .checkpoint import CHECKPOINT_PREFIX, latest_checkpoint, load_checkpoint, save_checkpoint
from .episode_loss import EpisodeLoss
from .prompt_targets import load_prompt_targets
from .run_log import read_log, truncate_log

DEV_EVAL_SEED = 12345
logger = logging.getLogger(__name__)


def load_split_tasks(split: str, names: Optional[list[str]] = None) -> list[Task]:
    """The tasks of a split (or the named ones, each checked to belong to it)."""
    names = names or tasks_for_split(split)
    for name in names:
        check_allowed(name, split)
    return load_bigbench_tasks(names)


def metaicl_tasks_of(root: str, member: str, names: Optional[list[str]] = None) -> list[Task]:
    """The pools of MetaICL's `member` tasks (the named ones, each checked to belong to it)."""
    names = names or load_metaicl_splits(root)[member]
    check_metaicl_split(root, names, member)
    return [load_metaicl_pool(root, name) for name in names]


def train_tasks_of(args: TrainingArguments) -> list[Task]:
    """The tasks episodes are drawn from: MetaICL's train tasks and those of `task_dir` (either or both), else
    BIG-bench's train split."""
    if args.task_dir is None and args.metaicl_dir is None:
        return load_split_tasks("train", args.tasks)
    tasks = metaicl_tasks_of(args.metaicl_dir, "train", args.metaicl_tasks) if args.metaicl_dir else []
    return tasks + (load_bigbench_tasks(args.tasks or None, args.task_dir) if args.task_dir else [])


def dev_tasks_of(args: TrainingArguments) -> list[Task]:
    """The tasks of the dev loss: MetaICL's dev tasks (with `metaicl_dir`) and those of `dev_task_dir`; none for a
    run on `task_dir` alone; BIG-bench's dev split for a run on BIG-bench."""
    if args.task_dir is None and args.metaicl_dir is None:
        return load_split_tasks("dev")
    tasks = metaicl_tasks_of(args.metaicl_dir, "dev") if args.metaicl_dir else []
    return tasks + (load_bigbench_tasks(root=args.dev_task_dir) if args.dev_task_dir else [])


# Settings a PGM's weights are shaped by: a run started from a saved PGM must agree with it on all of them.
SHAPE_SETTINGS = ("prompt_design", "num_prompt_tokens", "lora_scope", "r", "padding_reparameterization")


def build_pgm(args: TrainingArguments):
    """A fresh PGM for `args`, or, with `init_from`, the saved one (trainable) after checking it is shaped as `args`."""
    lm, tokenizer = load_base_model(args.model)
    if args.init_from is not None:
        return _saved_pgm(lm, args), tokenizer
    config = MetaLPromptConfig(
        task_type="CAUSAL_LM",
        prompt_design=args.prompt_design,
        lora_scope=args.lora_scope,
        num_prompt_tokens=args.num_prompt_tokens,
        r=args.r,
        lora_alpha=args.lora_alpha,
        target_modules=args.target_modules,
        padding_reparameterization=args.padding_reparameterization,
        padding_init_token_ids=_token_ids(tokenizer, args.padding_init_text),
    )
    return get_peft_model(lm, config), tokenizer


def _token_ids(tokenizer, text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"padding_init_text {text!r} encodes to no tokens.")
    return ids


def _saved_pgm(lm, args: TrainingArguments):
    if Path(args.init_from).is_dir():
        check_pgm_folder(args.init_from)
    saved = PeftConfig.from_pretrained(args.init_from)
    if not isinstance(saved, MetaLPromptConfig):
        raise ValueError(f"init_from={args.init_from!r} holds a {type(saved).__name__}, not a MetaL-Prompt PGM.")
    must_match = [name for name in SHAPE_SETTINGS if not (args.grow_slots and name == "num_prompt_tokens")]
    differ = {name: (getattr(saved, name), getattr(args, name)) for name in must_match if getattr(saved, name) != getattr(args, name)}
    if differ:
        listed = ", ".join(f"{name}: saved {was!r}, settings {now!r}" for name, (was, now) in differ.items())
        raise ValueError(
            f"init_from={args.init_from!r} does not match this run's settings ({listed}). Set them as the saved PGM "
            "has them (a baked PGM has padding_reparameterization 'none'), or start from a fresh PGM."
        )
    if args.grow_slots:
        return _saved_pgm_with_more_slots(lm, args, saved)
    return attach_pgm(lm, args.init_from, is_trainable=True)


def _saved_pgm_with_more_slots(lm, args: TrainingArguments, saved: MetaLPromptConfig):
    """The saved PGM widened to `args.num_prompt_tokens` slots (`grow_slots`): LoRA as saved, and the saved slots'
    embeddings repeated in turn over the new slots, so every slot starts as one the PGM was trained with."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    if args.num_prompt_tokens <= saved.num_prompt_tokens:
        raise ValueError(
            f"grow_slots needs more slots than init_from={args.init_from!r} has (saved num_prompt_tokens "
            f"{saved.num_prompt_tokens}, settings {args.num_prompt_tokens}): raise num_prompt_tokens, or set "
            "grow_slots to false to continue with the saved K."
        )
    config = dataclasses.replace(saved, num_prompt_tokens=args.num_prompt_tokens, inference_mode=False)
    model = get_peft_model(lm, config)
    weights = load_peft_weights(args.init_from)
    [padding_key] = [key for key in weights if PADDING_ATTRIBUTE in key and key.endswith(".embedding")]
    slots = torch.arange(args.num_prompt_tokens) % saved.num_prompt_tokens
    weights[padding_key] = weights[padding_key][slots]
    result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise ValueError(f"init_from={args.init_from!r} holds weights this PGM has no place for: {result.unexpected_keys[:3]}")
    return model


def parameter_groups(model, padding_learning_rate: Optional[float]) -> list[dict[str, Any]]:
    """The optimizer's groups: every trainable parameter at the run's rate, or, with `padding_learning_rate`, the
    padding in a group of its own at that rate (LoRA first, so a group's index says what it holds)."""
    trainable = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    if padding_learning_rate is None:
        return [{"params": [parameter for _, parameter in trainable]}]
    padding = [parameter for name, parameter in trainable if PADDING_ATTRIBUTE in name]
    rest = [parameter for name, parameter in trainable if PADDING_ATTRIBUTE not in name]
    return [{"params": rest}, {"params": padding, "lr": padding_learning_rate}]


def _run_facts(args: TrainingArguments, steps: int, num_processes: int) -> dict[str, Any]:
    """What a PGM's training summary says of the run behind it, whether it finished (`save_final`) or is exported
    from a checkpoint (`export_checkpoint`)."""
    return {
        "base_model": args.model,
        "optimizer_steps": steps,
        "num_processes": num_processes,
        "episodes": episodes_seen(args, steps, num_processes),
        "episodes_before_this_run": episodes_before(args),
        "xp_range": list(args.xp_range),
        "xl_range": list(args.xl_range),
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def longest_context_before_answers(tasks: list[Task], args: TrainingArguments, tokenizer, template) -> int:
    """The most keys an episode of `tasks` can put before its answers: the prompt's slots, then as many
    demonstrations as `xl_range` allows and a query (every query, packed), each as long as the longest example
    (tokenized one by one)."""
    shots = [template.format_shot(example.as_shot()) for task in tasks for example in task.examples]
    longest = max((len(ids) for ids in tokenizer(shots, add_special_tokens=False)["input_ids"]), default=0)
    queries = args.num_queries if args.pack_queries else 1
    return args.num_prompt_tokens + (args.xl_range[1] + queries) * longest


def episodes_seen(args: TrainingArguments, steps: int, num_processes: int = 1) -> int:
    """Episodes a PGM has been meta-trained on after `steps` optimizer steps of this run: every step takes
    `gradient_accumulation_steps` episodes on each process, on top of those of the PGM the run started from."""
    return episodes_before(args) + steps * args.gradient_accumulation_steps * num_processes


def episodes_before(args: TrainingArguments) -> int:
    """Episodes the PGM a run starts from (`init_from`) had already been meta-trained on, from its training summary
    (0 for a fresh PGM), so that a run continued over sessions counts them all."""
    if args.init_from is None:
        return 0
    summary = PeftConfig.from_pretrained(args.init_from).training_summary or {}
    return int(summary.get("episodes", 0))


class MetaTrainer:
    """Runs `TrainingArguments`; `train(resume=True)` continues from the newest checkpoint in `output_dir`."""

    def __init__(self, args: TrainingArguments, model=None, tokenizer=None, train_tasks=None, dev_tasks=None) -> None:
        self.args = args
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.precision = resolve_precision("fp32" if args.mixed_precision == "no" else args.mixed_precision, device)
        # On a GPU bf16 is accelerate's autocast; on a CPU the frozen weights are cast once (`cast_frozen_weights`),
        # because autocast re-casts them on every call, which costs more than bf16 saves on short sequences.
        autocast = "bf16" if device == "cuda" and self.precision == "bf16" else "no"
        # The schedule is stepped once per optimizer step by the trainer itself (accelerate would step it once per
        # process, ending it N times too early with N processes); LoRA layers that a design never reads (the last
        # layer's query projection for prefix prompts) get no gradient, which DDP must be told about.
        self.accelerator = Accelerator(
            cpu=device == "cpu",  # several processes on a CPU machine (torchrun) then share gradients over gloo
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=autocast,
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        if self.accelerator.num_processes > 1:
            # Leave the process group while the interpreter is whole: a process that exits with it alive can abort in
            # gloo's threads ("terminate called without an active exception", seen once in the two-process test).
            atexit.register(self.accelerator.end_training)
        torch.manual_seed(args.seed)
        if model is None:
            model, tokenizer = build_pgm(args)
        if device == "cpu":
            cast_frozen_weights(model, self.precision)
        reads, graded = args.attn_implementation, None
        if args.attn_implementation == "auto" and device == "cpu":
            # SDPA reads without gradient several times faster than eager attention on a CPU; the passes that train
            # use eager attention while they are short (EpisodeLoss.eager_max_scores: graded_attention.md).
            reads, graded = "sdpa", "eager"
        if reads != "auto":
            model.get_base_model().set_attn_implementation(reads)
        self.model, self.tokenizer = model, tokenizer
        self.output_dir = Path(args.output_dir)
        train_tasks = train_tasks if train_tasks is not None else train_tasks_of(args)
        self.sampler = EpisodeSampler(
            train_tasks, args.xp_range, args.xl_range, args.num_queries, seed=args.seed * 1000 + self.accelerator.process_index,
            task_sampling=args.task_sampling, symbol_label_rate=args.symbol_label_rate,
            foreign_shots=args.task_contrast_weight > 0, query_sampling=args.query_sampling,
        )
        self.text_sampler = None
        if args.text_stage_steps > 0 or args.text_mix_rate > 0:
            self.text_sampler = TextSampler(train_tasks, seed=args.seed * 1000 + self.accelerator.process_index)
        self.dev_episodes = []
        if dev_tasks is None:
            dev_tasks = dev_tasks_of(args)
        if dev_tasks and args.eval_episodes > 0:  # eval_episodes=0: no dev loss
            dev_sampler = EpisodeSampler(dev_tasks, args.xp_range, args.xl_range, args.num_queries, seed=DEV_EVAL_SEED)
            drawn = [dev_sampler.episode(i) for i in range(args.eval_episodes)]
            # The dev loss is over the drawn episodes whose shots fit, the same ones at every evaluation.
            self.dev_episodes = [episode for episode in drawn if not self._too_long(episode)]
            if not self.dev_episodes:
                raise ValueError(
                    f"none of the {len(drawn)} dev episodes fits max_pgm_tokens={args.max_pgm_tokens}: their XP shots "
                    f"are longer, so the run would have no dev loss; raise max_pgm_tokens or lower xp_range "
                    f"({list(args.xp_range)})"
                )
        graded_pass = self._graded_pass(train_tasks + list(dev_tasks or [])) if args.compile_graded_pass else None
        prompt_targets = None
        if args.prompt_targets is not None:
            prompt_targets = load_prompt_targets(args.prompt_targets, [task.name for task in train_tasks], self.model.base_model)
        optimizer = torch.optim.AdamW(
            parameter_groups(self.model, args.padding_learning_rate), lr=args.learning_rate, weight_decay=args.weight_decay
        )
        scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
        self.loss_module, self.optimizer, self.scheduler = self.accelerator.prepare(
            EpisodeLoss(
                self.model,
                tokenizer,
                distillation_weight=args.distillation_weight,
                chunk_size=args.chunk_size,
                option_distillation_weight=args.option_distillation_weight,
                graded_attention=graded,
                gradient_from_answers_only=args.gradient_from_answers_only,
                pack_queries=args.pack_queries,
                prompt_targets=prompt_targets,
                prompt_target_weight=args.prompt_target_weight,
                shot_answers_weight=args.shot_answers_weight,
                option_ranking_weight=args.option_ranking_weight,
                label_prior_weight=args.label_prior_weight,
                refinement=args.refinement,
                task_contrast_weight=args.task_contrast_weight,
                graded_pass=graded_pass,
            ),
            optimizer,
            scheduler,
        )
        self.step = 0
        self.skipped_long = 0
        self.skipped_short_texts = 0
        self.earlier_seconds = 0.0  # training time of the sessions before a resume, so runs compare at equal wall-clock

    def _graded_pass(self, tasks: list[Task]) -> Optional[GradedPass]:
        """The compiled graded pass `compile_graded_pass` asks for; None (transformers' forward) where this machine
        or model cannot run it, said in one logged line. Buckets too small for the run's episodes are refused first,
        whatever the machine."""
        longest = longest_context_before_answers(tasks, self.args, self.tokenizer, self.model.base_model.template)
        limit = max_context_length(self.model.get_base_model())
        longest = min(longest, limit) if limit is not None else longest
        if longest > self.args.graded_pass_buckets[-1]:
            raise BucketTooSmallError(
                f"graded_pass_buckets' largest bucket, {self.args.graded_pass_buckets[-1]} keys, is smaller than this "
                f"run's longest episode, which can read up to {longest} keys before its answers (prompt, "
                f"{self.args.xl_range[1]} demonstrations and the queries, of the longest examples): add a bucket of at "
                f"least {longest}."
            )
        reason = why_not_compiled(self.model.get_base_model(), self.precision)
        if reason is not None:
            logger.warning("compile_graded_pass: the graded pass runs eager: %s.", reason)
            return None
        return GradedPass(self.model.get_base_model(), self.args.graded_pass_buckets)

    @property
    def log_path(self) -> Path:
        return self.output_dir / "log.jsonl"

    def _log(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with self.log_path.open("a") as log:
                log.write(json.dumps(record) + "\n")

    def _too_long(self, episode) -> bool:
        """Whether a text the PGM reads (the text's prefix; XP, and foreign shots if drawn) exceeds max_pgm_tokens."""
        if isinstance(episode, TextEpisode):
            texts = [episode.prefix]
        else:
            format_shots = self.model.base_model.template.format_shots
            texts = [format_shots([e.as_shot() for e in shots]) for shots in (episode.xp, episode.foreign_xp) if shots]
        return any(len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) > self.args.max_pgm_tokens for text in texts)

    def next_episode(self):
        """The next episode whose PGM input fits `max_pgm_tokens`: a text one during the text stage, and after it a
        text one at `text_mix_rate`; skipped ones are counted and logged, not hidden."""
        while True:
            episode = next(self.text_sampler) if self._text_turn() else next(self.sampler)
            if self._too_long(episode):
                self.skipped_long += 1
            elif self._nothing_to_predict(episode):
                self.skipped_short_texts += 1
            else:
                return episode

    def _nothing_to_predict(self, episode) -> bool:
        """A text whose continuation is too short leaves the loss no token to score (an empty mean, NaN)."""
        if not isinstance(episode, TextEpisode):
            return False
        return len(self.tokenizer(episode.continuation, add_special_tokens=False)["input_ids"]) < MIN_CONTINUATION_TOKENS

    def _text_turn(self) -> bool:
        """Whether the next episode is a text. After the text stage the draw is seeded by both samplers' positions,
        which checkpoints restore, so a resumed run interleaves exactly as an uninterrupted one."""
        if self.step < self.args.text_stage_steps:
            return True
        if self.args.text_mix_rate == 0:
            return False
        draw = random.Random(f"mix:{self.args.seed}:{self.accelerator.process_index}:{self.sampler.step}:{self.text_sampler.step}")
        return draw.random() < self.args.text_mix_rate

    def evaluate(self) -> float:
        """Mean query loss over fixed dev episodes, prompts made as at serving (eval mode, no gradient)."""
        return self.dev_metrics()["dev_loss"]

    def dev_metrics(self) -> dict[str, float]:
        """Each term of the loss over the fixed dev episodes (`dev_loss` the query loss, `dev_<term>` the others, such
        as option ranking and its accuracy, averaged over the episodes that have them), prompts made as at serving."""
        self.model.eval()
        terms: dict[str, list[float]] = {}
        with torch.no_grad():
            for episode in self.dev_episodes:
                for name, value in self.accelerator.unwrap_model(self.loss_module)(episode).items():
                    if name != "loss":
                        terms.setdefault("dev_loss" if name == "lm_loss" else f"dev_{name}", []).append(value.item())
        self.model.train()
        return {name: _mean(values) for name, values in terms.items()}

    def train(self, resume: bool = False, stop_after: Optional[int] = None) -> dict[str, Any]:
        """Train to `max_steps` (or stop early after `stop_after` optimizer steps, as a kill would)."""
        args = self.args
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:  # what the run is, for whoever reads its checkpoints later
            (self.output_dir / "training_args.json").write_text(json.dumps(args.to_dict(), indent=1) + "\n")
        if resume and (checkpoint := latest_checkpoint(self.output_dir)) is not None:
            meta = load_checkpoint(
                checkpoint, self.model, self.optimizer, self.scheduler, self.sampler,
                self.accelerator.process_index, self.accelerator.num_processes,
            )
            self.step, self.skipped_long = meta["step"], meta["extra"].get("skipped_long", 0)
            self.skipped_short_texts = meta["extra"].get("skipped_short_texts", 0)
            self.earlier_seconds = meta["extra"].get("train_seconds", 0.0)
            if self.text_sampler is not None and "text_sampler" in meta["extra"]:
                self.text_sampler.load_state_dict(meta["extra"]["text_sampler"])
            if self.accelerator.is_main_process and (dropped := truncate_log(self.log_path, self.step)):
                logger.info("Resuming at step %d: dropped %d log records of later steps, which the kill lost.", self.step, dropped)
        if self.step == 0 and self.dev_episodes:  # where the PGM starts, for comparison with later dev losses
            self._log({"step": 0, **self.dev_metrics()})
        self.model.train()
        start_step, started = self.step, time.perf_counter()
        self._started = started
        bar = tqdm(total=args.max_steps, initial=self.step, desc="meta-training", disable=not self.accelerator.is_local_main_process)
        running: list[float] = []
        running_parts: dict[str, list[float]] = {}  # the loss's terms (lm_loss, distillation, prompt_target, ...)
        while self.step < args.max_steps:
            mixed = args.text_mix_rate > 0 and self.step >= args.text_stage_steps
            for _ in range(args.gradient_accumulation_steps):
                with self.accelerator.accumulate(self.loss_module):
                    episode = self.next_episode()
                    is_text = isinstance(episode, TextEpisode)
                    losses = self.loss_module(episode)
                    self.accelerator.backward(losses["loss"])
                    if self.accelerator.sync_gradients:
                        self.accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                running.append(losses["loss"].item())
                for name, value in losses.items():
                    if name != "loss":  # a text episode's terms apart, when texts and tasks interleave
                        running_parts.setdefault(f"text_{name}" if mixed and is_text else name, []).append(value.item())
            self.scheduler.step()
            self.step += 1
            episodes = (self.step - start_step) * args.gradient_accumulation_steps * self.accelerator.num_processes
            episodes_per_s = episodes / (time.perf_counter() - started)
            bar.update(1)
            bar.set_postfix(loss=f"{sum(running[-20:]) / len(running[-20:]):.3f}", eps=f"{episodes_per_s:.2f}")
            record: dict[str, Any] = {}
            if self.step % args.log_every == 0:
                record.update(train_seconds=round(self._train_seconds(), 1))
                window = args.log_every * args.gradient_accumulation_steps
                record.update(loss=_mean(running[-window:]), lr=self.scheduler.get_last_lr()[0], episodes_per_s=episodes_per_s, skipped_long=self.skipped_long)
                if self.text_sampler is not None:
                    record.update(skipped_short_texts=self.skipped_short_texts)
                if len(running_parts) > 1:  # with more than one term, each one's mean too
                    record.update({name: _mean(values[-window:]) for name, values in running_parts.items()})
            if self.dev_episodes and (self.step % args.eval_every == 0 or self.step == args.max_steps):
                record.update(self.dev_metrics())
            if record:
                self._log({"step": self.step, **record})
            if self.step % args.checkpoint_every == 0:
                self._save_checkpoint()
            if stop_after is not None and self.step - start_step >= stop_after:
                break
        bar.close()
        summary = self._summary(running, time.perf_counter() - started)
        if self.step >= args.max_steps and self.accelerator.is_main_process:
            self.save_final(summary)
        return summary

    def _train_seconds(self) -> float:
        """Wall-clock seconds of training so far, over every session of the run."""
        return self.earlier_seconds + time.perf_counter() - self._started

    def _checkpoint_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "skipped_long": self.skipped_long, "skipped_short_texts": self.skipped_short_texts,
            "train_seconds": round(self._train_seconds(), 1),
        }
        if self.text_sampler is not None:
            extra["text_sampler"] = self.text_sampler.state_dict()
        return extra

    def _summary(self, running: list[float], seconds: float) -> dict[str, Any]:
        tail = running[-50:] or [math.nan]
        return {
            **_run_facts(self.args, self.step, self.accelerator.num_processes),
            "train_tasks": len(self.sampler.tasks),
            "final_train_loss": round(sum(tail) / len(tail), 4),
            "skipped_long_episodes": self.skipped_long,
            "seconds_this_run": round(seconds, 1),
        }

    def _save_checkpoint(self) -> None:
        """A checkpoint whose PGM folder says how far this run had trained it, so a run started from that folder
        (`init_from`) counts its episodes, rather than those of the PGM this run started from."""
        model = self.accelerator.unwrap_model(self.loss_module).model
        model.peft_config[model.active_adapter].training_summary = {
            **_run_facts(self.args, self.step, self.accelerator.num_processes),
            "checkpoint_of": self.output_dir.name,
        }
        save_checkpoint(
            self.output_dir, self.step, model, self.optimizer, self.scheduler, self.sampler, self._checkpoint_extra(),
            self.accelerator,
        )

    def save_final(self, summary: dict[str, Any]) -> Path:
        model = self.accelerator.unwrap_model(self.loss_module).model
        return export_pgm(model, self.output_dir / "pgm", summary, self.log_path, self.args)


def export_pgm(model, target: Path, summary: dict[str, Any], log_path: Path, args: TrainingArguments) -> Path:
    """The shippable PGM: padding baked into plain embeddings (same prompts, small file), the training facts in its
    config and model card, and `training_log.json` (the run's JSONL log as one list) beside it."""
    model.base_model.bake_padding()
    config = model.peft_config[model.active_adapter]
    config.training_summary = {**summary, "settings": json.dumps(args.to_dict())}
    # A PGM never resizes or trains the embeddings; saying so keeps PEFT from asking the Hub for the base model's
    # config to check (a network call at every save, which this machine cannot make).
    model.save_pretrained(target, save_embedding_layers=False)
    records = read_log(Path(log_path), through_step=summary["optimizer_steps"])
    (Path(target) / "training_log.json").write_text(json.dumps(records, indent=1))
    return Path(target)


def export_checkpoint(
    output_dir: str | Path, target: str | Path, step: Optional[int] = None, dev_results: Optional[dict[str, float]] = None
) -> Path:
    """A run's checkpoint (the newest, or `step`) exported as a shippable PGM, as a finished run exports its last one;
    so a run that continues across sessions can ship what it has so far. `dev_results` (method -> dev-panel accuracy)
    go into the model card's eval results."""
    output_dir = Path(output_dir)
    checkpoint = output_dir / f"{CHECKPOINT_PREFIX}{step}" if step is not None else latest_checkpoint(output_dir)
    if checkpoint is None or not (checkpoint / "pgm" / "adapter_config.json").is_file():
        found = sorted(path.name for path in output_dir.glob(f"{CHECKPOINT_PREFIX}*"))
        raise ValueError(f"No checkpoint {checkpoint or ''} in {output_dir}; it has {found or 'none'}.")
    args_file = output_dir / "training_args.json"
    if not args_file.is_file():
        raise ValueError(f"{args_file} is missing: the run's settings are needed to describe the exported PGM.")
    args = TrainingArguments(**json.loads(args_file.read_text()))
    steps = int(checkpoint.name[len(CHECKPOINT_PREFIX) :])
    state = json.loads((checkpoint / "state.json").read_text())
    lm, _ = load_base_model(args.model)
    model = attach_pgm(lm, checkpoint / "pgm")
    log_path = output_dir / "log.jsonl"
    losses = [record["loss"] for record in read_log(log_path, through_step=steps) if record.get("loss") is not None]
    summary = {
        **_run_facts(args, steps, state.get("num_processes", 1)),
        "final_train_loss": round(losses[-1], 4) if losses else None,
        "skipped_long_episodes": state["extra"].get("skipped_long", 0),
        "exported_from": f"{output_dir.name}/{checkpoint.name}",
    }
    if dev_results:
        summary["dev_results"] = dev_results
    return export_pgm(model, Path(target), summary, log_path, args)
