"""Splitting the generation shots into chunks the PGM can read, for iterative prompt generation.

More shots than fit the PGM's context are folded in one chunk at a time: the prompt made from one chunk is read back
by the PGM, before the next chunk and the padding, so the last prompt has seen every shot.
"""

from __future__ import annotations

from typing import Optional, Union

from transformers import PreTrainedTokenizerBase

from .reading import ContextTooLongError
from .template import Shot, ShotTemplate

ChunkSize = Union[int, str, None]


def chunk_shots(
    shots: list[Shot],
    tokenizer: PreTrainedTokenizerBase,
    template: ShotTemplate,
    num_prompt_tokens: int,
    context_limit: Optional[int],
    chunk_size: ChunkSize = None,
) -> list[list[int]]:
    """Token ids of each chunk. `chunk_size`: None = one chunk (it must fit), an int = that many shots per chunk,
    "auto" = as many shots per chunk as fit. The first chunk has room for `context_limit - K` tokens, later ones for
    `context_limit - 2K` (the previous prompt takes K positions); a chunk that cannot fit raises ValueError."""
    if chunk_size is None:
        chunks = [shots]
    elif chunk_size == "auto":
        chunks = _pack(shots, tokenizer, template, num_prompt_tokens, context_limit)
    elif isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size > 0:
        chunks = [shots[i : i + chunk_size] for i in range(0, len(shots), chunk_size)]
    else:
        raise ValueError(f"chunk_size must be None, 'auto' or a positive int, got {chunk_size!r}.")
    encoded = [template.encode_shots(chunk, tokenizer) for chunk in chunks]
    for index, (chunk, ids) in enumerate(zip(chunks, encoded)):
        _check_fits(index, len(chunk), len(ids), num_prompt_tokens, context_limit, single=len(chunks) == 1)
    return encoded


def _budget(index: int, num_prompt_tokens: int, context_limit: int) -> int:
    return context_limit - num_prompt_tokens * (1 if index == 0 else 2)


def _pack(
    shots: list[Shot],
    tokenizer: PreTrainedTokenizerBase,
    template: ShotTemplate,
    num_prompt_tokens: int,
    context_limit: Optional[int],
) -> list[list[Shot]]:
    """Greedy: each chunk takes shots while the tokenized chunk still fits its budget."""
    if context_limit is None:
        return [shots]
    chunks: list[list[Shot]] = [[]]
    for shot in shots:
        candidate = chunks[-1] + [shot]
        if chunks[-1] and len(template.encode_shots(candidate, tokenizer)) > _budget(len(chunks) - 1, num_prompt_tokens, context_limit):
            chunks.append([shot])
        else:
            chunks[-1] = candidate
    return chunks


def _check_fits(
    index: int, num_shots: int, num_tokens: int, num_prompt_tokens: int, context_limit: Optional[int], single: bool
) -> None:
    if context_limit is None:
        return
    budget = _budget(index, num_prompt_tokens, context_limit)
    if num_tokens <= budget:
        return
    over = num_tokens - budget
    if single:
        raise ContextTooLongError(
            f"The {num_shots} generation shots take {num_tokens} tokens; with K={num_prompt_tokens} padding positions "
            f"that is {num_tokens + num_prompt_tokens}, {over} over the model's context of {context_limit}. Pass fewer "
            f"or shorter shots, keep some as demonstrations (num_demonstrations), or fold them in chunk by chunk "
            f"(chunk_size='auto')."
        )
    raise ContextTooLongError(
        f"Chunk {index} ({num_shots} shots, {num_tokens} tokens) is {over} tokens over the {budget} a chunk may take "
        f"(context {context_limit}, K={num_prompt_tokens}). Use a smaller chunk_size or shorter shots."
    )
