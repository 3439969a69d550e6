"""The distribution an LM puts on the options of multiple-choice queries, scored as evaluation scores them (mean
log-probability per token after the query): what MEND-style option distillation compares between teacher and student,
and what the option-ranking term trains towards the correct option.

For distillation the option rows continue each query's cached keys/values with the gold answer masked out, so no
query is read twice; the ranking term reads each (query, option) pair as a query row of its own, so that with
`gradient_from_answers_only` only the options' tokens carry a gradient.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..compat import cache_from_layers, cache_kwargs
from ..data import Example
from ..metal_prompt import ShotTemplate
from ..metal_prompt.queries import QueryBatch, encode_queries
from ..metal_prompt.reading import kept_targets, positions_from_mask


@dataclass
class OptionRows:
    """Every option of every multiple-choice query of a batch, one row each, right-padded."""

    query_index: torch.Tensor  # R: the query row each option row continues
    input_ids: torch.Tensor  # R x W
    attention_mask: torch.Tensor  # R x W
    groups: list[list[int]]  # per multiple-choice query, its option rows in the order of its options


# Every option row holds a copy of its query's keys and values over the whole context: their bytes are bounded, and
# queries whose options would go over (tasks with dozens of options, long contexts) are left out of this term.
OPTION_CACHE_BUDGET_BYTES = 512 << 20


def encode_options(
    queries: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    template: ShotTemplate,
    device: torch.device,
    row_bytes: int = 0,
    budget_bytes: int = OPTION_CACHE_BUDGET_BYTES,
) -> Optional[OptionRows]:
    """Option rows for the queries that have options (None when none has, or none fits the budget): `row_bytes` is
    what one row's copy of the keys/values costs; queries are taken in order while their rows fit `budget_bytes`."""
    index, rows, groups = [], [], []
    for query_row, example in enumerate(queries):
        if example.options is None:
            continue
        if row_bytes * (len(rows) + len(example.options)) > budget_bytes:
            continue
        group = []
        for option in example.options:
            group.append(len(rows))
            index.append(query_row)
            rows.append(tokenizer(template.format_answer(option), add_special_tokens=False)["input_ids"])
        groups.append(group)
    if not rows:
        return None
    width = max(len(row) for row in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], device=device)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
    return OptionRows(torch.tensor(index, device=device), input_ids, mask, groups)


def option_scores(
    lm: PreTrainedModel,
    layers: list[tuple[torch.Tensor, torch.Tensor]],
    batch: QueryBatch,
    query_logits: torch.Tensor,
    options: OptionRows,
    position_offset: int = 0,
) -> torch.Tensor:
    """Mean log-probability per token of every option row (R), differentiable where `layers` and `query_logits` are.

    `layers` are the keys/values after [context][query + gold answer] (batch x ... x context+width x ...), and
    `query_logits` the logits at the query positions; the option's first token is scored by the logits of the last
    query token, the rest by the option row itself, which sees the context and its query but not the gold answer.
    """
    width = batch.input_ids.shape[1]
    context_length = layers[0][0].shape[2] - width
    answer = batch.labels != -100
    answer_start = answer.float().argmax(dim=1)  # every training query has an answer
    visible = batch.attention_mask.masked_fill(answer, 0)
    rows = options.query_index
    selected = [(keys.index_select(0, rows), values.index_select(0, rows)) for keys, values in layers]
    size = rows.shape[0]
    mask = torch.cat([visible.new_ones(size, context_length), visible[rows], options.attention_mask], dim=1)
    positions = positions_from_mask(mask)[:, context_length + width :] + position_offset
    logits = lm(
        input_ids=options.input_ids,
        attention_mask=mask,
        position_ids=positions,
        **cache_kwargs(lm, cache_from_layers(selected)),
        use_cache=False,
    ).logits
    tokens = options.input_ids
    first = F.log_softmax(query_logits[rows, answer_start[rows] - 1].float(), dim=-1).gather(1, tokens[:, :1])
    rest = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    token_logprobs = torch.cat([first, rest], dim=1) * options.attention_mask
    return token_logprobs.sum(dim=1) / options.attention_mask.sum(dim=1)


def option_distillation_loss(teacher_scores: torch.Tensor, student_scores: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """KL(teacher || student) between the two distributions over each query's options, averaged over queries."""
    losses = []
    for group in groups:
        index = torch.tensor(group, device=student_scores.device)
        teacher = F.log_softmax(teacher_scores.index_select(0, index), dim=0)
        student = F.log_softmax(student_scores.index_select(0, index), dim=0)
        losses.append(F.kl_div(student, teacher, log_target=True, reduction="sum"))
    return torch.stack(losses).mean()


@dataclass
class OptionQueries:
    """Every (query, option) pair of a batch's multiple-choice queries as a query batch labelled on the option, with
    each query's rows and which of them are correct."""

    batch: QueryBatch
    groups: list[list[int]]  # per multiple-choice query, its rows in the order of its options
    correct: list[list[int]]  # per multiple-choice query, the positions (within its group) of its correct options


# Every ranked option is a query row with its own graded pass, so a query's options are ranked against at most this
# many: a train task with 100 options (abstract_narrative_understanding/99_distractors) would otherwise make 400 rows of
# long narratives in one episode, gigabytes of activations.
MAX_RANKED_OPTIONS = 8


def ranked_options(example: Example, max_options: int = MAX_RANKED_OPTIONS) -> list[str]:
    """The options a query is ranked over: all of them when they are at most `max_options`, else its correct ones and
    distractors drawn at random (seeded by the example, so a resumed run draws the same), in the options' order."""
    options = list(example.options or ())
    if len(options) <= max_options:
        return options
    distractors = [option for option in options if option not in example.answers]
    rng = random.Random(f"{example.input}\x00{example.output}")
    kept = set(rng.sample(distractors, max(1, max_options - (len(options) - len(distractors)))))
    return [option for option in options if option in example.answers or option in kept]


def encode_option_queries(
    queries: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    template: ShotTemplate,
    device: torch.device,
    max_options: int = MAX_RANKED_OPTIONS,
) -> Optional[OptionQueries]:
    """One row per ranked option (`ranked_options`) of every query with two or more options (None when there is
    none); an option is correct when it is one of the example's answers (`output` or a tied alternative; `Example`
    holds them among its options)."""
    pairs, groups, correct = [], [], []
    for example in queries:
        if example.options is None or len(example.options) < 2:
            continue
        options = ranked_options(example, max_options)
        groups.append(list(range(len(pairs), len(pairs) + len(options))))
        correct.append([i for i, option in enumerate(options) if option in example.answers])
        pairs.extend((example.input, option) for option in options)
    if not pairs:
        return None
    return OptionQueries(encode_queries(pairs, tokenizer, template, device), groups, correct)


def row_mean_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean log-probability per labelled token of each row, from logits at a row's last `logits.shape[1]` positions
    (each predicting the next token) and the rows' full labels: evaluation's `acc_per_token` score, differentiable."""
    targets = kept_targets(logits, labels)
    scored = targets != -100
    logprobs = -F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets.masked_fill(~scored, 0), reduction="none"
    )
    return (logprobs * scored).sum(dim=1) / scored.sum(dim=1)


def option_ranking(scores: torch.Tensor, options: OptionQueries) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each query's softmax over its options' scores against its correct options (their total
    probability), averaged over queries; and the share of queries whose best-scored option is correct (not a loss)."""
    losses, hits = [], []
    for group, right in zip(options.groups, options.correct):
        group_scores = scores[group[0] : group[-1] + 1]
        losses.append(torch.logsumexp(group_scores, dim=0) - torch.logsumexp(group_scores[right], dim=0))
        hits.append(float(int(group_scores.argmax()) in right))
    return torch.stack(losses).mean(), torch.tensor(sum(hits) / len(hits))


def shared_option_list(queries: Sequence[Example], max_options: int = MAX_RANKED_OPTIONS) -> Optional[tuple[str, ...]]:
    """The options every query of an episode has, in one order (a classification task's label set), when they are at
    most `max_options` (so each query is ranked over all of them); None otherwise."""
    first = queries[0].options if queries else None
    if first is None or not 2 <= len(first) <= max_options:
        return None
    return first if all(example.options == first for example in queries) else None


def label_distribution(shots: Sequence[Example], options: Sequence[str]) -> Optional[torch.Tensor]:
    """How often each option is the output of `shots`, add-one smoothed (so no label gets zero mass, which a KL could
    not reach): the label prior the shots show. None when a shot's output is not among `options`."""
    counts = torch.ones(len(options))
    for example in shots:
        if example.output not in options:
            return None
        counts[options.index(example.output)] += 1
    return counts / counts.sum()


def label_prior_loss(scores: torch.Tensor, options: OptionQueries, target: torch.Tensor) -> torch.Tensor:
    """KL(target || the mean over queries of each query's softmax over its options): small when the labels the LM
    picks after the prompt are spread over the options as `target` says, whatever the query; every group must list
    the same options in the same order as `target`."""
    chosen = torch.stack([F.softmax(scores[group[0] : group[-1] + 1], dim=0) for group in options.groups]).mean(dim=0)
    target = target.to(chosen.device)
    return (target * (target.log() - chosen.clamp_min(1e-12).log())).sum()
