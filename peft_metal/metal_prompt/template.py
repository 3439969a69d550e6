"""How shots become text (and tokens): one template, shared by meta-training and serving so the PGM sees what it
learned on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from transformers import PreTrainedTokenizerBase

Shot = tuple[str, str]
ShotLike = Union[Sequence[str], Mapping[str, str]]


class Shots(tuple):
    """Shots that have been checked: a tuple of (input, output) string pairs. Made once where shots enter (an API
    call, a request body, a file); `normalize_shots` passes it through, so nothing downstream checks them again."""


def normalize_shots(shots: Any, *, allow_empty: bool = False) -> Shots:
    """Accept `[(input, output), ...]` or `[{"input": ..., "output": ...}, ...]`; reject anything else loudly."""
    if isinstance(shots, Shots) and (shots or allow_empty):
        return shots
    if isinstance(shots, (str, bytes)) or not isinstance(shots, Sequence):
        raise TypeError(
            f"shots must be a list of (input, output) pairs or {{'input', 'output'}} dicts, got {type(shots).__name__}."
        )
    if not shots and not allow_empty:
        raise ValueError("No shots given: pass at least one (input, output) example of the task.")
    normalized = []
    for index, shot in enumerate(shots):
        if isinstance(shot, Mapping):
            missing = {"input", "output"} - set(shot)
            if missing:
                raise ValueError(f"Shot {index} lacks the key(s) {sorted(missing)}; each shot needs 'input' and 'output'.")
            pair = (shot["input"], shot["output"])
        elif isinstance(shot, Sequence) and not isinstance(shot, (str, bytes)) and len(shot) == 2:
            pair = (shot[0], shot[1])
        else:
            raise TypeError(f"Shot {index} is not an (input, output) pair: {shot!r}.")
        for field_name, value in zip(("input", "output"), pair):
            if not isinstance(value, str):
                raise TypeError(f"Shot {index}: {field_name} must be a string, got {type(value).__name__}.")
        normalized.append(pair)
    return Shots(normalized)


@dataclass(frozen=True)
class ShotTemplate:
    """`{input_prefix}{input}{output_prefix} {output}{shot_separator}` for every shot.

    The answer follows the output prefix after one space (none if the prefix ends in a newline), so a query ends at the
    output prefix and its answer is a natural continuation for the tokenizer.
    """

    input_prefix: str = "Input: "
    output_prefix: str = "\nOutput:"
    shot_separator: str = "\n\n"

    @classmethod
    def from_config(cls, config: Any) -> "ShotTemplate":
        return cls(config.input_prefix, config.output_prefix, config.shot_separator)

    def format_query(self, input_text: str) -> str:
        """The text the LM continues with the answer."""
        return f"{self.input_prefix}{input_text}{self.output_prefix.rstrip(' ')}"

    def format_answer(self, output_text: str) -> str:
        """The answer as it follows `format_query`; also the continuation scored during training and evaluation."""
        separator = "" if self.output_prefix.endswith("\n") else " "
        return f"{separator}{output_text}"

    def format_shot(self, shot: Shot) -> str:
        return self.format_query(shot[0]) + self.format_answer(shot[1]) + self.shot_separator

    def format_shots(self, shots: Sequence[Shot]) -> str:
        return "".join(self.format_shot(shot) for shot in shots)

    def encode_shots(self, shots: Sequence[Shot], tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """The token ids of `format_shots(shots)`, without special tokens: how the PGM reads shots and the LM reads
        demonstrations."""
        return tokenizer(self.format_shots(shots), add_special_tokens=False)["input_ids"]
