"""The meta-training objective for one episode: -log P_LM(y | prompt(XP), XL, x), averaged over its answer tokens,
plus, optionally, distillation from the LM reading every shot as a demonstration (MEND's teacher), the distance of
the prompt to its task's refined prompt (`prompt_targets`), the same cross-entropy on XP's own answers (what
refinement minimizes), a cross-entropy over multiple-choice queries' options (what evaluation ranks), a KL pinning the
labels the LM picks after the prompt to the label distribution of XP (the prompt's label prior) and a contrast with the
prompt made from another family's shots (what a prompt that ignores its shots cannot win). With a
`refinement`, the queries score the prompt after serving's refinement on XP, to first order (MAML's approximation).

It is an `nn.Module` so that `accelerate` can wrap it (for several processes the gradient sync of DDP is set up by the
wrapper's forward, and the PGM's work happens inside this forward).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict
from typing import ContextManager, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..compat import (
    attention_implementation,
    cache_from_layers,
    cache_kwargs,
    cache_layers,
    current_attention_implementation,
    expand_cache,
    returned_cache,
)
from ..data import Episode
from ..data.text import MIN_CONTINUATION_TOKENS, TextEpisode
from ..metal_prompt import ShotTemplate
from ..metal_prompt.graded_pass import GradedPass
from ..metal_prompt.model import ReadShots
from ..metal_prompt.prompt import GeneratedPrompt
from ..metal_prompt.queries import QueryBatch, encode_queries
from ..metal_prompt.reading import keeps_logits, model_device, positions_from_mask
from ..metal_prompt.refine import Refinement, first_order
from .options import (
    encode_option_queries,
    encode_options,
    label_distribution,
    label_prior_loss,
    option_distillation_loss,
    option_ranking,
    option_scores,
    row_mean_logprobs,
    shared_option_list,
)
from .prompt_targets import prompt_target_loss

# Eager attention keeps every layer's scores (rows x queries x keys, per head) for the backward; SDPA does not. On short
# graded passes eager is as fast or a little faster (benchmarks/results/train_throughput_attention.md), on long ones
# SDPA is up to twice as fast, and eager's scores ran a paper's-scope run out of 24 GB
# (benchmarks/results/graded_attention.md). So an episode whose largest graded pass would keep more scores than this,
# per head and layer, takes its graded passes with the reads' attention instead.
EAGER_MAX_SCORES = 2**18


class EpisodeLoss(nn.Module):
    """Wraps the PEFT model; `forward(episode)` makes the prompt from XP in train mode and scores the queries.

    With `lora_scope="padding"` the frozen LM reads XP once; the PGM's padding and the teacher both continue from
    those keys/values, so the teacher costs only the demonstrations and the query tokens.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        distillation_weight: float = 0.0,
        chunk_size: Optional[int] = None,
        option_distillation_weight: float = 0.0,
        graded_attention: Optional[str] = None,
        gradient_from_answers_only: bool = False,
        prompt_targets: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None,
        prompt_target_weight: float = 0.0,
        shot_answers_weight: float = 0.0,
        option_ranking_weight: float = 0.0,
        label_prior_weight: float = 0.0,
        refinement: Optional[Refinement] = None,
        task_contrast_weight: float = 0.0,
        pack_queries: bool = False,
        graded_pass: Optional[GradedPass] = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.distillation_weight = distillation_weight
        self.option_distillation_weight = option_distillation_weight
        self.chunk_size = chunk_size
        # The attention implementation for the passes that carry a gradient (the PGM and the student LM), when it
        # differs from the model's own, which the no-grad reads (shots, teacher) keep; for episodes whose graded
        # passes keep at most `eager_max_scores` scores per head and layer.
        self.graded_attention = graded_attention
        self.eager_max_scores = EAGER_MAX_SCORES
        # The query tokens before the answers read without gradient (see `forward_with_prompt`).
        self.gradient_from_answers_only = gradient_from_answers_only
        self.reading_attention = current_attention_implementation(model.get_base_model())
        # Refined prompts by task name (training/prompt_targets.py); episodes of other tasks (dev) have none.
        self.prompt_targets = prompt_targets or {}
        self.prompt_target_weight = prompt_target_weight
        self.shot_answers_weight = shot_answers_weight
        self.option_ranking_weight = option_ranking_weight
        self.label_prior_weight = label_prior_weight
        # Serving's refinement, applied to each episode's prompt (on XP) before the queries score it; first order.
        self.refinement = refinement
        # The term that asks a prompt of another family's shots to serve the queries worse (`_task_contrast`).
        self.task_contrast_weight = task_contrast_weight
        # Queries scored only for their loss are read as packed rows, not a padded batch (metal_prompt/packing.py).
        self.pack_queries = pack_queries and gradient_from_answers_only
        # The answers' graded pass of the reads scored only for their loss, bucketed and maybe compiled (graded_pass.py).
        self.graded_pass = graded_pass if gradient_from_answers_only else None

    def graded_scores(self, xp_tokens: int, xl_tokens: int, batch: QueryBatch) -> int:
        """Attention scores per head and layer of an episode's largest graded pass: the PGM over XP and its slots
        (only the slots in the compressed scope), or the queries after the prompt and XL."""
        slots = self.model.base_model.metal_config.num_prompt_tokens
        pgm_rows = slots if self._reads_shots_once else xp_tokens + slots
        size, width = batch.input_ids.shape
        return max(pgm_rows * (xp_tokens + slots), size * width * (slots + xl_tokens + width))

    def _graded_attention(self, scores: int) -> Optional[str]:
        """`graded_attention` for an episode whose largest graded pass keeps at most `eager_max_scores` scores per
        head and layer, else the reads' own attention."""
        if self.graded_attention is None:
            return None
        return self.graded_attention if scores <= self.eager_max_scores else self.reading_attention

    def _graded(self, implementation: Optional[str]) -> ContextManager[None]:
        if implementation is None or not torch.is_grad_enabled():
            return nullcontext()
        return attention_implementation(self.model.get_base_model(), implementation)

    @property
    def template(self) -> ShotTemplate:
        return self.model.base_model.template

    @property
    def _reads_shots_once(self) -> bool:
        return self.model.base_model.metal_config.lora_scope == "padding" and self.chunk_size is None

    def _encode(self, examples) -> torch.Tensor:
        """Shots formatted with the template, as 1-D token ids."""
        text = self.template.format_shots([example.as_shot() for example in examples])
        return self._ids(text, model_device(self.model.get_base_model()))

    def forward(self, episode: Episode | TextEpisode) -> dict[str, torch.Tensor]:
        if isinstance(episode, TextEpisode):
            return self._text_forward(episode)
        tuner = self.model.base_model
        xl_shots = [example.as_shot() for example in episode.xl]
        xp_ids, xl_ids = self._encode(episode.xp), self._encode(episode.xl)
        shots_read = tuner.read_shots(xp_ids) if self._reads_shots_once else None
        contrast = self.task_contrast_weight > 0 and bool(episode.foreign_xp)
        foreign_read = tuner.read_shots(self._encode(episode.foreign_xp)) if contrast and self._reads_shots_once else None
        device = model_device(self.model.get_base_model())
        batch = encode_queries([e.as_shot() for e in episode.queries], self.tokenizer, self.template, device)
        graded = self._graded_attention(self.graded_scores(len(xp_ids), len(xl_ids), batch))
        with self._graded(graded):
            prompt = self._prompt(episode.xp, xl_shots, shots_read)
            if self.refinement is not None:
                prompt = self._refined(prompt, episode)
            options = None
            if self.option_distillation_weight > 0:
                options = encode_options(
                    episode.queries, self.tokenizer, self.template, device,
                    self._option_row_bytes(max(prompt.context_length, len(xp_ids) + len(xl_ids)) + batch.input_ids.shape[1]),
                )
            # Without distillation only the answers' logits are needed, and without it and the options only the loss.
            loss_only = self.distillation_weight == 0 and options is None
            outputs = self._answer(
                prompt, batch, use_cache=options is not None, only_labelled_logits=loss_only, loss_only=loss_only
            )
            losses = {"lm_loss": outputs.loss}
            if contrast:
                losses["foreign_lm_loss"], losses["task_contrast"] = self._task_contrast(
                    outputs.loss, episode, xl_shots, batch, foreign_read
                )
            if self.shot_answers_weight > 0:
                losses["shot_answers"] = self._shot_answers_loss(prompt, episode, device)
            if self.option_ranking_weight > 0 or self.label_prior_weight > 0:
                losses.update(self._option_terms(prompt, episode, device))
        target = self.prompt_targets.get(episode.task_name)
        if target is not None:
            losses["prompt_target"] = prompt_target_loss(prompt, target, self.model.get_base_model())
        if self.distillation_weight > 0 or options is not None:
            if shots_read is None:
                shots_read = tuner.read_shots(xp_ids)
            teacher_logits, teacher_layers = self._teacher(shots_read, xl_ids, batch)
            if self.distillation_weight > 0:
                losses["distillation"] = distillation_loss(outputs.logits, teacher_logits, batch.attention_mask)
            if options is not None:
                losses["option_distillation"] = self._option_distillation(
                    options, batch, outputs, teacher_logits, teacher_layers, shots_read.first_position, graded
                )
        losses["loss"] = (
            losses["lm_loss"]
            + self.distillation_weight * losses.get("distillation", 0.0)
            + self.option_distillation_weight * losses.get("option_distillation", 0.0)
            + self.prompt_target_weight * losses.get("prompt_target", 0.0)
            + self.shot_answers_weight * losses.get("shot_answers", 0.0)
            + self.option_ranking_weight * losses.get("option_ranking", 0.0)
            + self.label_prior_weight * losses.get("label_prior", 0.0)
            + self.task_contrast_weight * losses.get("task_contrast", 0.0)
        )
        return losses

    def _prompt(self, xp, xl_shots: list, shots_read: Optional[ReadShots]) -> GeneratedPrompt:
        """The prompt made from the examples `xp` (already read by the frozen LM when `shots_read` is given), with
        `xl_shots` kept as its demonstrations."""
        if shots_read is not None:
            return self.model.base_model.generate_prompt_from_read_shots(shots_read, self.tokenizer, demonstrations=xl_shots)
        return self.model.generate_prompt(
            [example.as_shot() for example in xp] + xl_shots,
            tokenizer=self.tokenizer,
            num_demonstrations=len(xl_shots),
            chunk_size=self.chunk_size,
        )

    def _task_contrast(
        self, own_loss: torch.Tensor, episode: Episode, xl_shots: list, batch: QueryBatch, foreign_read: Optional[ReadShots]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The queries' loss after the prompt made from another family's shots (`foreign_read`: those shots read by
        the frozen LM, as XP's; the same demonstrations), and softplus(own loss - that loss): small when the prompt
        made from the task's own shots serves its queries clearly better, which a prompt that ignores its shots cannot
        do. Its gradient reaches the PGM through both prompts, so it rewards prompts that carry their task."""
        foreign = self._prompt(episode.foreign_xp, xl_shots, foreign_read)
        foreign_loss = self._answer(foreign, batch, loss_only=True).loss
        return foreign_loss, F.softplus(own_loss - foreign_loss)

    def _refined(self, prompt: GeneratedPrompt, episode: Episode) -> GeneratedPrompt:
        """The prompt after serving's refinement on XP (the shots the PGM read), as a first-order function of the
        one-pass prompt, so the queries' loss trains the PGM towards the start refinement takes furthest."""
        # With serving's attention, not the eager attention of the graded passes: eager keeps every layer's scores
        # over XP's rows for the backward, and a run with it was OOM-killed at 10.5 GB in one process.
        with attention_implementation(self.model.get_base_model(), self.reading_attention):
            refined = self.model.base_model.refine_prompt(
                prompt, [example.as_shot() for example in episode.xp], self.tokenizer, **asdict(self.refinement)
            )
        return first_order(prompt, refined, self.model.get_base_model())

    def _shot_answers_loss(self, prompt, episode: Episode, device: torch.device) -> torch.Tensor:
        """-log P_LM(y | prompt(XP), XL, x) over XP's own pairs (x, y), read as the queries are: as many pairs as the
        episode has queries (XP's order is already random), so the term costs about what the queries cost: all of XP's
        pairs (up to 16 rows, each padded to the longest) made a step of 4 episodes take some 30 s on this CPU's two
        processes, against 6 to 9 s without the term (the two runs' logs)."""
        pairs = [example.as_shot() for example in episode.xp[: len(episode.queries)]]
        return self._answer(prompt, encode_queries(pairs, self.tokenizer, self.template, device), loss_only=True).loss

    def _option_terms(self, prompt, episode: Episode, device: torch.device) -> dict[str, torch.Tensor]:
        """The terms read from each multiple-choice query's option scores (mean log-probability per token, as
        evaluation ranks them); none for an episode without such queries.

        `option_ranking`: cross-entropy of each query's softmax over its options against its correct ones, and
        `option_accuracy`, the share ranked right (a metric, logged beside the losses, never added to them). The gold
        answer's own cross-entropy raises every option that shares its tokens; this term asks that it beat the others.

        `label_prior`: when every query has the same options, KL(XP's label distribution || the queries' mean softmax
        over them). The queries' own loss lets the prompt lean to whichever label its training episodes favoured
        (raw macro-F1 swings between checkpoints while calibrated holds); this asks its lean to follow the shots'.
        """
        label_set = shared_option_list(episode.queries)
        target = label_distribution(episode.xp, label_set) if self.label_prior_weight > 0 and label_set else None
        options = encode_option_queries(episode.queries, self.tokenizer, self.template, device)
        if options is None or (self.option_ranking_weight == 0 and target is None):  # no term to read the scores
            return {}
        scores = row_mean_logprobs(self._answer(prompt, options.batch).logits, options.batch.labels)
        terms = {}
        if self.option_ranking_weight > 0:
            loss, accuracy = option_ranking(scores, options)
            terms.update(option_ranking=loss, option_accuracy=accuracy.to(device))
        if target is not None:
            terms["label_prior"] = label_prior_loss(scores, options, target)
        return terms

    def _answer(
        self, prompt, batch: QueryBatch, use_cache: bool = False, only_labelled_logits: bool = True, loss_only: bool = False
    ):
        """The LM reading `batch` (queries and their answers) after `prompt`, scored on the answers; `loss_only`: the
        caller reads only the loss (so the queries may be packed)."""
        return self.model(
            prompt=prompt,
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            labels=batch.labels,
            use_cache=use_cache,
            only_labelled_logits=only_labelled_logits,
            gradient_from_answers_only=self.gradient_from_answers_only,
            reading_attention=self.reading_attention,
            pack_queries=loss_only and self.pack_queries,
            graded_pass=self.graded_pass if loss_only else None,
        )

    def _text_forward(self, episode: TextEpisode) -> dict[str, torch.Tensor]:
        """The generic-text stage: the prompt made from the text's first part, the LM predicting the rest after it
        (cross-entropy on every continuation token), and the distillation from the LM that read the first part."""
        tuner = self.model.base_model
        device = model_device(self.model.get_base_model())
        prefix = self._ids(episode.prefix, device)
        continuation = self._ids(episode.continuation, device).unsqueeze(0)
        if continuation.shape[1] < MIN_CONTINUATION_TOKENS:
            raise ValueError(
                f"text episode of {episode.task_name!r} has a continuation of {continuation.shape[1]} token(s) "
                f"({episode.continuation!r}): at least {MIN_CONTINUATION_TOKENS} are needed for a loss; cut the text elsewhere."
            )
        shots_read = None
        if self._reads_shots_once:
            shots_read = tuner.read_shots(prefix)
            prompt = tuner.generate_prompt_from_read_shots(shots_read, self.tokenizer)
        else:
            prompt = tuner.generate_prompt_from_ids(prefix, self.tokenizer)
        batch = QueryBatch(continuation, torch.ones_like(continuation), continuation)
        outputs = self.model(prompt=prompt, input_ids=continuation, labels=continuation)
        losses = {"lm_loss": outputs.loss}
        if self.distillation_weight > 0:
            if shots_read is None:
                shots_read = tuner.read_shots(prefix)
            teacher_logits, _ = self._teacher(shots_read, prefix.new_zeros(0), batch)
            losses["distillation"] = distillation_loss(outputs.logits, teacher_logits, batch.attention_mask)
        losses["loss"] = losses["lm_loss"] + self.distillation_weight * losses.get("distillation", 0.0)
        return losses

    def _ids(self, text: str, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long, device=device)

    def _option_row_bytes(self, length: int) -> int:
        """Bytes of one option row's copy of the keys/values over `length` positions (the larger of the student's and
        the teacher's context, plus the query batch), over every layer."""
        config = self.model.get_base_model().config.get_text_config(decoder=True)
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        element = self.model.get_base_model().get_input_embeddings().weight.element_size()
        return 2 * config.num_hidden_layers * kv_heads * head_dim * length * element

    def _option_distillation(
        self, options, batch, outputs, teacher_logits, teacher_layers, teacher_offset, graded: Optional[str]
    ) -> torch.Tensor:
        """KL from the teacher's distribution over each multiple-choice query's options to the student's."""
        lm = self.model.get_base_model()
        with self.model.base_model.lm_only(), self._graded(graded):
            student = option_scores(lm, cache_layers(returned_cache(outputs)), batch, outputs.logits, options)
            with torch.no_grad():
                teacher = option_scores(lm, teacher_layers, batch, teacher_logits, options, teacher_offset)
        return option_distillation_loss(teacher, student, options.groups)

    @torch.no_grad()
    def _teacher(
        self, shots: ReadShots, demonstrations: torch.Tensor, batch: QueryBatch
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The frozen LM's logits at the query positions after [XP][XL][query], continuing from the XP keys/values,
        and its keys/values over all of it. XL is read once (batch 1), then every query continues from it."""
        tuner = self.model.base_model
        lm = self.model.get_base_model()
        layers = shots.layers
        next_position = shots.next_position
        with tuner.lm_only():
            if demonstrations.numel():
                positions = torch.arange(next_position, next_position + demonstrations.numel(), device=demonstrations.device)
                out = lm.base_model(
                    input_ids=demonstrations.unsqueeze(0),
                    position_ids=positions.unsqueeze(0),
                    **cache_kwargs(lm.base_model, cache_from_layers(layers)),
                    use_cache=True,
                )
                layers = cache_layers(returned_cache(out))
                next_position += demonstrations.numel()
            size, width = batch.input_ids.shape
            context_length = layers[0][0].shape[2]
            mask = torch.cat([batch.attention_mask.new_ones(size, context_length), batch.attention_mask], dim=1)
            positions = positions_from_mask(mask)[:, context_length:] + shots.first_position
            extra = {"logits_to_keep": width} if keeps_logits(lm) else {}
            out = lm(
                input_ids=batch.input_ids,
                attention_mask=mask,
                position_ids=positions,
                **cache_kwargs(lm, expand_cache(layers, size)),
                use_cache=True,
                **extra,
            )
            return out.logits[:, -width:], cache_layers(returned_cache(out))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the full vocabulary, averaged over every real query and answer token predicted
    from inside the query (MEND's objective; the cross-entropy on the gold answer is added by the caller, since KL
    alone would cap the student at the teacher)."""
    predicted = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    teacher = F.log_softmax(teacher_logits[:, :-1][predicted].float(), dim=-1)
    student = F.log_softmax(student_logits[:, :-1][predicted].float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")
