"""The frozen LM reading a context (a generated prompt, demonstrations, or nothing) and then scoring continuations or
decoding: the one layer evaluation and serving both stand on.

* `context`: `Context` (what the LM has read, computed once per prompt and only read after) and the one LM call.
* `scoring`: log-likelihoods of answer options after a batch of queries, and of every token of a text.
* `decoding`: new tokens for a batch of queries, each with its own sampling settings and stops.
* `answers`: where a generated answer ends and which option wins.
* `calibration`: which option wins once the prior a context gives the options (read on the shots) is divided out.

A single query is a batch of one everywhere.
"""

from ..metal_prompt.reading import ContextTooLongError, check_fits, eos_token_ids, max_context_length, model_device
from .answers import best_option, cut_generation, has_stop
from .calibration import (
    CALIBRATIONS,
    calibrated_pick,
    calibrated_scores,
    option_log_probabilities,
    option_prior,
)
from .context import Context, empty_context, extend_context, prompt_context
from .decoding import EOS, LENGTH, STOP, Generation, Sampling, generate
from .model_parts import ModelParts
from .scoring import ContinuationScore, TokenLogprob, read_queries, score_options, score_tokens

__all__ = [
    "CALIBRATIONS",
    "EOS",
    "LENGTH",
    "STOP",
    "Context",
    "ContextTooLongError",
    "ContinuationScore",
    "Generation",
    "ModelParts",
    "Sampling",
    "TokenLogprob",
    "best_option",
    "calibrated_pick",
    "calibrated_scores",
    "check_fits",
    "cut_generation",
    "empty_context",
    "eos_token_ids",
    "extend_context",
    "generate",
    "has_stop",
    "max_context_length",
    "model_device",
    "option_log_probabilities",
    "option_prior",
    "prompt_context",
    "read_queries",
    "score_options",
    "score_tokens",
]
