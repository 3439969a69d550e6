"""Everything a meta-training run is made of, in one JSON-serialisable dataclass (see examples/*/ and experiments/configs/)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from ..metal_prompt.graded_pass import DEFAULT_BUCKETS, check_buckets
from ..metal_prompt.refine import DEFAULT_BATCH_SIZE, Refinement, check_refinement

# "auto": bf16 where the hardware multiplies it fast (a CUDA GPU, or a CPU with AMX / AVX512-BF16), else fp32;
# "no" is the same as "fp32".
MIXED_PRECISIONS = ("auto", "no", "fp32", "bf16")


@dataclass
class TrainingArguments:
    """Meta-training settings. Episodes come from MetaICL's train tasks (`metaicl_dir`), a folder of one's own tasks
    (`task_dir`), or both; from BIG-bench's train families only where neither is given and a clone's task folders are
    named by `$PEFT_METAL_BIGBENCH_TASKS`."""

    output_dir: str = "runs/metal"
    model: str = "smollm2-135m"
    prompt_design: str = "prefix"
    num_prompt_tokens: int = 16
    lora_scope: str = "all"  # "padding": the compressed-context PGM (see MetaLPromptConfig.lora_scope)
    r: int = 8
    lora_alpha: int = 16
    padding_reparameterization: str = "lstm"
    padding_init_text: Optional[str] = None  # text whose tokens start the padding slots (default: random tokens)
    target_modules: Optional[list[str]] = None
    max_steps: int = 1000
    learning_rate: float = 1e-3
    # The padding's own rate (default: learning_rate). Input embeddings trained as prompts (prompt tuning, P-tuning)
    # are usually given far larger rates than LoRA weights.
    padding_learning_rate: Optional[float] = None
    weight_decay: float = 0.0
    warmup_steps: int = 50
    gradient_accumulation_steps: int = 4
    max_grad_norm: float = 1.0
    xp_range: tuple[int, int] = (2, 16)
    xl_range: tuple[int, int] = (0, 4)
    num_queries: int = 4
    # "family": every task family equally likely (see data.episodes.TASK_SAMPLINGS); "task": every task.
    task_sampling: str = "task"
    # The share of classification episodes whose labels are renamed to arbitrary words (data.episodes.SYMBOL_LABELS).
    symbol_label_rate: float = 0.0
    # "balanced": a classification task's queries take its labels in turn (data.episodes.QUERY_SAMPLINGS), so the
    # loss, like macro-F1, counts every label alike; "random": its own label frequencies. The dev loss draws at random.
    query_sampling: str = "random"
    max_pgm_tokens: int = 1536
    chunk_size: Optional[int] = None
    tasks: Optional[list[str]] = None
    # One's own tasks instead of BIG-bench's: a folder of task folders in BIG-bench's JSON format to draw episodes from
    # (every task in it, or those `tasks` names; BIG-bench's split does not apply), and one for the dev loss (without
    # it a run on `task_dir` has no dev loss; a run on BIG-bench takes its dev split).
    task_dir: Optional[str] = None
    dev_task_dir: Optional[str] = None
    # MetaICL's tasks (a folder with data/ and splits.json): episodes from the pools of its train tasks (those
    # `metaicl_tasks` names, or every train task), the dev loss on its dev tasks; alone or beside `task_dir`.
    metaicl_dir: Optional[str] = None
    metaicl_tasks: Optional[list[str]] = None
    seed: int = 0
    checkpoint_every: int = 200
    eval_every: int = 200
    eval_episodes: int = 16
    log_every: int = 10
    distillation_weight: float = 0.0  # KL to the LM reading every shot, full vocabulary, every query and answer token
    option_distillation_weight: float = 0.0  # KL to that LM's distribution over a multiple-choice query's options
    # The optional generic-text first stage: the first `text_stage_steps` optimizer steps compress the first part of
    # texts made from train-task inputs and predict (and distil) the rest; the task episodes follow.
    text_stage_steps: int = 0
    # After the text stage, the share of episodes that are texts (drawn at random, seeded), interleaved with the task
    # episodes: the text objective kept on while the task objective trains.
    text_mix_rate: float = 0.0
    mixed_precision: str = "auto"
    # "auto": on a CPU, SDPA for the reads without gradient and eager attention for the passes that train (7% more
    # episodes/s than eager throughout: benchmarks/results/train_throughput_attention.md) while they are short, SDPA
    # for long ones (EpisodeLoss.eager_max_scores); the model's own choice on a GPU; or any transformers attention
    # name, used for every pass.
    attn_implementation: str = "auto"
    # Read each query's tokens before its answer without gradient, so only the answer positions take the graded
    # pass: the same loss, a gradient cut to the answers' own attention to the prompt, and a cheaper episode.
    gradient_from_answers_only: bool = False
    # With `gradient_from_answers_only`: read an episode's queries as packed rows (each sees the context and its own
    # tokens) instead of a batch left-padded to the longest; the same loss, each query's gradient cut exactly at its own
    # answer (metal_prompt/packing.py). Off by default: it saved 3% an episode on MetaICL's short queries and cost 10%
    # on the BIG-bench-format tasks, whose long queries make the packed rows' attention, quadratic in all of an
    # episode's query tokens, outweigh the padding saved (benchmarks/results/train_throughput_{metaicl,tasks}.md).
    pack_queries: bool = False
    # With `gradient_from_answers_only`: run the answers' graded pass as plain tensor code compiled by inductor, its
    # lengths padded up to `graded_pass_buckets` (keys before the answers; metal_prompt/graded_pass.py). Where it
    # cannot run (no bf16 hardware, no inductor, not a Llama-style LM) the run goes eager and logs why once. A run
    # whose longest possible episode needs more keys than the largest bucket is refused before it starts.
    compile_graded_pass: bool = False
    graded_pass_buckets: list[int] = field(default_factory=lambda: list(DEFAULT_BUCKETS))
    # A folder of refined prompts, one per train task (`peft-metal prompt-targets`), and the weight of the loss that
    # pulls each episode's prompt towards its task's target (training/prompt_targets.py).
    prompt_targets: Optional[str] = None
    prompt_target_weight: float = 0.0
    # The weight of the loss on XP's own answers: the LM, after the prompt made from XP, answers XP's inputs (as many
    # as the episode has queries). It is what refinement minimizes (prompt tuning on the shots), asked of the one pass
    # on every episode and every task.
    shot_answers_weight: float = 0.0
    # The weight of a cross-entropy over each multiple-choice query's options, scored as evaluation ranks them (mean
    # log-probability per answer token), towards the correct one: the dev panel's own criterion as a training term.
    option_ranking_weight: float = 0.0
    # The weight of a KL from XP's label distribution (add-one smoothed) to the labels the LM picks after the prompt,
    # averaged over the queries (each query's softmax over its options), on episodes whose queries share one label
    # set: it pins the prompt's label prior to the shots', which the queries' loss alone lets wander.
    label_prior_weight: float = 0.0
    # Train the PGM for the refinement its prompts get at serving (`Refinement`): each episode's prompt is refined
    # this many Adam steps on XP's own pairs (at `refinement_lr`, default serving's 5e-2) before the queries score it,
    # and the gradient reaches the PGM to first order (MAML's first-order approximation: the refinement's shift is
    # held constant). 0: the queries score the one-pass prompt, as the paper trains.
    refinement_steps: int = 0
    refinement_lr: Optional[float] = None
    # The weight of a term that asks the queries to score worse with a prompt made from another family's shots than
    # with their own: softplus(loss(own prompt) - loss(foreign prompt)). A prompt that ignores its shots (the one
    # generic prompt the panel's prompt swaps found) gains nothing on it; one that carries its task does. Each episode
    # then also draws as many shots of another family's task (`Episode.foreign_xp`), read and scored as XP's are.
    task_contrast_weight: float = 0.0
    init_from: Optional[str] = None  # a saved PGM folder to start from (continued meta-training; same design, K, r)
    # With init_from, a num_prompt_tokens larger than the saved PGM's: its LoRA is kept as saved and its K slots are
    # repeated in turn over the new ones (slot i starts as saved slot i mod K), so a longer prompt starts from what
    # the shorter one learnt instead of from scratch.
    grow_slots: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.xp_range = tuple(self.xp_range)
        self.xl_range = tuple(self.xl_range)
        for name in ("max_steps", "gradient_accumulation_steps", "num_queries", "checkpoint_every", "eval_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.padding_learning_rate is not None and not self.padding_learning_rate > 0:
            raise ValueError(f"padding_learning_rate must be positive (or null: learning_rate), got {self.padding_learning_rate}.")
        for name in ("task_dir", "dev_task_dir"):
            folder = getattr(self, name)
            if folder is not None and not Path(folder).is_dir():
                raise ValueError(f"{name}={folder!r} is not a folder: give the folder that holds the task folders.")
        if self.metaicl_dir is not None and not (Path(self.metaicl_dir) / "splits.json").is_file():
            raise ValueError(
                f"metaicl_dir={self.metaicl_dir!r} is not a MetaICL data folder: give the folder that holds data/ and "
                "splits.json."
            )
        if self.metaicl_tasks is not None and self.metaicl_dir is None:
            raise ValueError("metaicl_tasks names tasks of metaicl_dir: set metaicl_dir too.")
        if self.tasks is not None and self.task_dir is None and self.metaicl_dir is not None:
            raise ValueError("tasks names tasks of task_dir (or BIG-bench's); MetaICL's are named by metaicl_tasks.")
        if self.eval_episodes < 0:
            raise ValueError(f"eval_episodes must be >= 0 (0: no dev loss), got {self.eval_episodes}.")
        if not 0 <= self.text_stage_steps <= self.max_steps:
            raise ValueError(f"text_stage_steps must be between 0 and max_steps ({self.max_steps}), got {self.text_stage_steps}.")
        if not 0 <= self.text_mix_rate < 1:
            raise ValueError(
                f"text_mix_rate must be in [0, 1), got {self.text_mix_rate}: it is the share of texts among the episodes "
                "after the text stage (a run of texts only is text_stage_steps = max_steps)."
            )
        for name in ("distillation_weight", "option_distillation_weight", "prompt_target_weight", "shot_answers_weight",
                     "option_ranking_weight", "label_prior_weight", "task_contrast_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.gradient_from_answers_only and (self.distillation_weight or self.option_distillation_weight):
            raise ValueError(
                "gradient_from_answers_only keeps the student's logits at the answers only, but distillation needs them "
                "at every query token (and option distillation over every option): set the distillation weights to 0 "
                "or gradient_from_answers_only to false."
            )
        if (self.prompt_targets is None) != (self.prompt_target_weight == 0):
            raise ValueError(
                f"prompt_targets={self.prompt_targets!r} and prompt_target_weight={self.prompt_target_weight} go "
                "together: give both (a folder from `peft-metal prompt-targets` and a weight > 0) or neither."
            )
        if self.prompt_targets is not None and self.symbol_label_rate > 0:
            raise ValueError(
                f"symbol_label_rate={self.symbol_label_rate} renames an episode's labels, which its task's prompt "
                "target (refined on the real labels) does not know: set symbol_label_rate to 0 to use prompt_targets."
            )
        check_refinement(self.refinement_steps, self.refinement_lr, DEFAULT_BATCH_SIZE)
        if self.refinement_lr is not None and self.refinement_steps == 0:
            raise ValueError(f"refinement_lr={self.refinement_lr} is set but refinement_steps is 0: set both, or neither.")
        if self.task_contrast_weight > 0 and self.refinement_steps > 0:
            raise ValueError(
                f"task_contrast_weight={self.task_contrast_weight} scores the one-pass prompts of XP and of foreign "
                f"shots, but refinement_steps={self.refinement_steps} trains for refined ones: set one of them to 0."
            )
        if self.grow_slots and self.init_from is None:
            raise ValueError("grow_slots widens the PGM given by init_from: set init_from too, or grow_slots to false.")
        if self.compile_graded_pass and not self.gradient_from_answers_only:
            raise ValueError("compile_graded_pass compiles the answers' graded pass: it needs gradient_from_answers_only true.")
        check_buckets(self.graded_pass_buckets)
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}.")

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> "TrainingArguments":
        """Settings from a JSON file; `"extends": "other.json"` (relative to the file) takes that file's settings
        first, so a config that varies another says only what it changes."""
        data = cls.settings_from_json(path)
        data.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**data)

    @classmethod
    def settings_from_json(cls, path: str | Path) -> dict[str, Any]:
        """A config's settings as written, its `extends` chain merged, before any is checked (say, to see which task
        folders it names)."""
        return cls._settings_of(Path(path), ())

    @classmethod
    def _settings_of(cls, path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
        if path.resolve() in seen:
            chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
            raise ValueError(f"{path}: configs extend each other in a circle ({chain}).")
        data = json.loads(path.read_text())
        base = data.pop("extends", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown training settings {unknown}; known ones are {sorted(known)} and 'extends'.")
        if base is None:
            return data
        base_path = path.parent / base
        if not base_path.is_file():
            raise ValueError(f"{path}: extends {base!r}, but {base_path} is not a file (the path is relative to {path.parent}).")
        return {**cls._settings_of(base_path, (*seen, path.resolve())), **data}

    @property
    def refinement(self) -> Optional[Refinement]:
        """The refinement each episode's prompt gets before the queries score it, if any."""
        return Refinement(self.refinement_steps, self.refinement_lr) if self.refinement_steps else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["xp_range"], data["xl_range"] = list(self.xp_range), list(self.xl_range)
        return data
