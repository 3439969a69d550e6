"""Configuration of a MetaL-Prompt prompt generation model (PGM)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Optional

from peft import LoraConfig
from peft.utils import PeftType

from ..designs import DESIGNS

PROMPT_DESIGNS = tuple(DESIGNS)
PADDING_REPARAMETERIZATIONS = ("lstm", "mlp", "none")
LORA_SCOPES = ("all", "padding")


@dataclass
class MetaLPromptConfig(LoraConfig):
    """A LoRA config plus what MetaL-Prompt adds on top of the LoRA that turns the frozen LM into its PGM.

    The PGM reads the formatted generation shots followed by `num_prompt_tokens` trainable padding embeddings and the
    prompt is read at those padding positions, so one forward pass yields the whole prompt. All LoRA options (`r`,
    `lora_alpha`, `target_modules`, ...) keep their PEFT meaning.
    """

    # Called as write(save_directory, config) after every save of the config; `registration.register` puts the
    # model card's writer here (the card reads a config; the config knows nothing of cards).
    written_beside: ClassVar[tuple[Callable[[str, "MetaLPromptConfig"], None], ...]] = ()

    prompt_design: str = field(
        default="prefix", metadata={"help": f"How the prompt is read at the padding positions: one of {PROMPT_DESIGNS}."}
    )
    num_prompt_tokens: int = field(default=16, metadata={"help": "K: padding positions, i.e. prompt length."})
    lora_scope: Literal["all", "padding"] = field(
        default="all",
        metadata={
            "help": "Where the PGM's LoRA is on: 'all' (the paper's form: the PGM reads the shots and the padding with "
            "LoRA on) or 'padding' (the compressed-context PGM: the frozen LM reads the shots once, without gradient, "
            "and LoRA is on only at the K padding positions, which attend to those shots' keys and values)."
        },
    )
    padding_reparameterization: Literal["lstm", "mlp", "none"] = field(
        default="lstm", metadata={"help": "Reparameterization of the trainable padding, as in P-tuning."}
    )
    padding_init_token_ids: Optional[list[int]] = field(
        default=None,
        metadata={
            "help": "Token ids whose embeddings start the K padding slots (cycled to K); default: seeded random "
            "vocabulary tokens. Separator tokens make the untrained slots read like a pause after the shots."
        },
    )
    padding_hidden_size: Optional[int] = field(
        default=None, metadata={"help": "Hidden size of the padding's LSTM/MLP; defaults to the LM's hidden size."}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Gumbel-softmax temperature (discrete) and softmax temperature (weighted_sum)."}
    )
    input_prefix: str = field(default="Input: ", metadata={"help": "Put before every shot's input."})
    output_prefix: str = field(default="\nOutput:", metadata={"help": "Put between a shot's input and its output (then one space)."})
    shot_separator: str = field(default="\n\n", metadata={"help": "Put after every shot."})
    training_summary: Optional[dict[str, Any]] = field(
        default=None, metadata={"help": "Facts about meta-training (tasks, steps, ...) shown in the model card."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.METAL_PROMPT
        if self.prompt_design not in PROMPT_DESIGNS:
            raise ValueError(f"Unknown prompt_design {self.prompt_design!r}; choose one of {PROMPT_DESIGNS}.")
        if self.lora_scope not in LORA_SCOPES:
            raise ValueError(f"Unknown lora_scope {self.lora_scope!r}; choose one of {LORA_SCOPES}.")
        if self.padding_reparameterization not in PADDING_REPARAMETERIZATIONS:
            raise ValueError(
                f"Unknown padding_reparameterization {self.padding_reparameterization!r}; "
                f"choose one of {PADDING_REPARAMETERIZATIONS}."
            )
        if isinstance(self.num_prompt_tokens, bool) or not isinstance(self.num_prompt_tokens, int):
            raise TypeError(f"num_prompt_tokens must be an int, got {type(self.num_prompt_tokens).__name__}.")
        if self.num_prompt_tokens <= 0:
            raise ValueError(f"num_prompt_tokens (K) must be positive, got {self.num_prompt_tokens}.")
        if self.padding_init_token_ids is not None:
            ids = self.padding_init_token_ids
            if not isinstance(ids, (list, tuple)) or not ids or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
            ):
                raise TypeError(f"padding_init_token_ids must be a non-empty list of token ids, got {ids!r}.")
            self.padding_init_token_ids = list(ids)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}.")
        for name in ("input_prefix", "output_prefix", "shot_separator"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string, got {type(getattr(self, name)).__name__}.")

    def to_dict(self) -> dict[str, Any]:
        """PEFT's dict with set-valued fields (`target_modules`) sorted, so a PGM's config saved twice is the same file
        (a set's order changes from process to process)."""
        return {key: sorted(value) if isinstance(value, set) else value for key, value in super().to_dict().items()}

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Save `adapter_config.json`, then what is written beside it whenever it is saved (`written_beside`).

        `PeftModel.save_pretrained` writes its generic model card before the config and offers tuners no hook of their
        own, so saving the config is the one moment after it; registration puts the PGM's own card there.
        """
        super().save_pretrained(save_directory, **kwargs)
        for write in self.written_beside:
            write(save_directory, self)
