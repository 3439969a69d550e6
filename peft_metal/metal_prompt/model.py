"""`MetaLPromptModel`: the PEFT tuner that makes one frozen LM serve as both the PGM (LoRA on) and the LM (LoRA off)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator, Optional

import torch
from peft import LoraModel
from torch import nn
from transformers import Cache, PreTrainedModel, PreTrainedTokenizerBase

from ..compat import (
    cache_from_layers,
    cache_kwargs,
    cache_layers,
    has_shift_invariant_positions,
    returned_cache,
    set_lora_enabled,
)
from ..designs import PGMReadout, get_design
from .chunking import ChunkSize, chunk_shots
from .config import MetaLPromptConfig
from .fingerprint import base_model_fingerprint, check_same_base
from .layer import TrainablePadding
from .prompt import GeneratedPrompt
from .reading import forward_with_prompt, generate_with_prompt, max_context_length, model_device
from .refine import DEFAULT_BATCH_SIZE, PromptTuning, Refinement
from .template import Shots, ShotTemplate, normalize_shots

PADDING_ATTRIBUTE = "metal_padding"
PADDING_INIT_SEED = 0


def _check_sizes_fit(config: MetaLPromptConfig, model: nn.Module) -> None:
    """Refuse a K or LoRA rank the LM cannot use, before anything of that size is allocated: an edited or mistyped
    config (K = 2**31, say) would otherwise take all the memory, not fail."""
    positions = max_context_length(model)
    if positions is not None and config.num_prompt_tokens >= positions:
        raise ValueError(
            f"num_prompt_tokens (K) = {config.num_prompt_tokens} leaves no position for the shots: the model reads at "
            f"most {positions} positions. Choose a K well under that."
        )
    rank, width = config.r, getattr(model.config.get_text_config(decoder=True), "hidden_size", None)
    if isinstance(rank, int) and not isinstance(rank, bool) and width is not None and rank > width:
        raise ValueError(
            f"LoRA rank r = {rank} is larger than the model's hidden size {width}, which bounds the rank of every "
            f"update LoRA can make; choose r <= {width}."
        )


class MetaLPromptModel(LoraModel):
    """LoRA on the base LM's projections (PEFT's own layers), plus one `TrainablePadding` per adapter.

    LoRA is switched on only inside `generate_prompt`; every other call (the LM reading a prompt, or a plain forward)
    runs the untouched base weights, of which there is a single copy.
    """

    prefix: str = "lora_"

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        _check_sizes_fit(self.peft_config[adapter_name], model)
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if not hasattr(self, PADDING_ATTRIBUTE):
            self.metal_padding = nn.ModuleDict()
        self.metal_padding[adapter_name] = self._new_padding(self.peft_config[adapter_name])
        self._set_padding_trainability()
        self._set_lora(False)

    def set_adapter(self, adapter_name: str | list[str], *args: Any, **kwargs: Any) -> None:
        super().set_adapter(adapter_name, *args, **kwargs)
        self._set_padding_trainability()

    def _set_padding_trainability(self) -> None:
        """Like PEFT does for LoRA weights: only the active adapter's padding trains, and none in inference mode."""
        for name, padding in getattr(self, PADDING_ATTRIBUTE, {}).items():
            padding.requires_grad_(name in self.active_adapters and not self.peft_config[name].inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        del self.metal_padding[adapter_name]

    def bake_padding(self) -> None:
        """Replace each adapter's reparameterized padding by the embeddings it produces (reparameterization "none").

        The LSTM/MLP only helps optimization; once training is done its output is all the PGM uses, so a PGM for
        serving or sharing is smaller (K x hidden instead of the whole LSTM) and makes exactly the same prompts.
        """
        for name, padding in self.metal_padding.items():
            with torch.no_grad():
                baked = padding.reparameterize().detach()
            self.metal_padding[name] = TrainablePadding(padding.num_tokens, baked, "none").to(baked.device)
            self.peft_config[name].padding_reparameterization = "none"
            self.peft_config[name].padding_hidden_size = None
        self._set_padding_trainability()

    def _new_padding(self, config: MetaLPromptConfig) -> TrainablePadding:
        """Padding initialized from real token embeddings: of `padding_init_token_ids` (cycled to K) when given, else
        of random (but seeded, hence reproducible) vocabulary tokens."""
        embedding = self.model.get_input_embeddings().weight
        if config.padding_init_token_ids:
            ids = config.padding_init_token_ids
            if max(ids) >= embedding.shape[0]:
                raise ValueError(f"padding_init_token_ids holds {max(ids)}, beyond the vocabulary of {embedding.shape[0]}.")
            token_ids = torch.tensor([ids[i % len(ids)] for i in range(config.num_prompt_tokens)])
        else:
            generator = torch.Generator().manual_seed(PADDING_INIT_SEED)
            token_ids = torch.randint(embedding.shape[0], (config.num_prompt_tokens,), generator=generator)
        padding = TrainablePadding(
            config.num_prompt_tokens,
            embedding.detach()[token_ids.to(embedding.device)],
            config.padding_reparameterization,
            config.padding_hidden_size,
        )
        return padding.to(embedding.device)

    # ------------------------------------------------------------------ LoRA on/off

    def _set_lora(self, enabled: bool) -> None:
        set_lora_enabled(self.model, enabled)

    def pgm_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The PGM's own parameters (LoRA and the padding), by the name PEFT saves them under; the rest is the LM."""
        for name, parameter in self.named_parameters():
            if is_pgm_parameter(name):
                yield name, parameter

    def lm_only(self) -> Iterator[None]:
        """Context in which the model is the plain LM (every LoRA layer off), whatever runs inside."""
        return self._lora(False)

    @contextmanager
    def _lora(self, enabled: bool) -> Iterator[None]:
        self._set_lora(enabled)
        try:
            yield
        finally:
            self._set_lora(False)

    # ------------------------------------------------------------------ the PGM

    @property
    def metal_config(self) -> MetaLPromptConfig:
        return self.peft_config[self.active_adapters[0]]

    @property
    def template(self) -> ShotTemplate:
        return ShotTemplate.from_config(self.metal_config)

    def base_fingerprint(self) -> dict[str, Any]:
        """The base LM's fingerprint, hashed once per embedding tensor."""
        weight = self.model.get_input_embeddings().weight
        key = (weight.data_ptr(), tuple(weight.shape), weight.dtype)
        if getattr(self, "_fingerprint_key", None) != key:
            self._fingerprint = base_model_fingerprint(self.model)
            self._fingerprint_key = key
        return self._fingerprint

    def generate_prompt(
        self,
        shots: Any,
        tokenizer: PreTrainedTokenizerBase,
        num_demonstrations: int = 0,
        chunk_size: ChunkSize = None,
        refinement: Optional[Refinement] = None,
    ) -> GeneratedPrompt:
        """One PGM forward over the generation shots XP and the padding; the prompt is read at the padding.

        The last `num_demonstrations` shots are XL: they are not read by the PGM but kept, as tokens, between the
        prompt and every query. With `chunk_size` (an int, or "auto" for as many as fit) XP is folded in chunk by
        chunk, each pass reading the previous prompt first. In train mode the prompt keeps its autograd graph, so a
        loss on it trains the PGM (through every chunk). With `refinement`, the prompt is then tuned on XP
        (`refine_prompt`; not on XL, whose answers the LM could copy from its context).
        """
        if refinement is not None and not isinstance(refinement, Refinement):
            raise TypeError(f"refinement must be a Refinement (or None), got {type(refinement).__name__}.")
        shots = normalize_shots(shots)
        *_, prompt = self.prompt_passes(shots, tokenizer, num_demonstrations, chunk_size)
        if refinement is None:
            return prompt
        return self.refine_prompt(prompt, shots[: len(shots) - num_demonstrations], tokenizer, **asdict(refinement))

    def prompt_passes(
        self, shots: Any, tokenizer: PreTrainedTokenizerBase, num_demonstrations: int = 0, chunk_size: ChunkSize = None
    ) -> Iterator[GeneratedPrompt]:
        """`generate_prompt` (without refinement) one PGM pass per chunk: each `next()` runs one pass and yields the
        prompt so far; the last holds the demonstrations and is the prompt. The arguments are checked and the chunks
        tokenized at the call, before any pass; the service serves waiting completions between passes."""
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"generate_prompt needs the base model's tokenizer, got {type(tokenizer).__name__}.")
        shots = normalize_shots(shots)
        if isinstance(num_demonstrations, bool) or not isinstance(num_demonstrations, int):
            raise TypeError(f"num_demonstrations must be an int, got {type(num_demonstrations).__name__}.")
        if not 0 <= num_demonstrations < len(shots):
            raise ValueError(
                f"num_demonstrations={num_demonstrations} must be between 0 and {len(shots) - 1}: with "
                f"{len(shots)} shots at least one has to be left for the PGM to read."
            )
        split = len(shots) - num_demonstrations
        chunks = chunk_shots(
            shots[:split], tokenizer, self.template, self.metal_config.num_prompt_tokens,
            max_context_length(self.model), chunk_size,
        )
        return self._passes(chunks, shots[split:], tokenizer)

    def _passes(
        self, chunks: list[list[int]], demonstrations: Shots, tokenizer: PreTrainedTokenizerBase
    ) -> Iterator[GeneratedPrompt]:
        prompt = None
        for index, chunk_ids in enumerate(chunks):
            prompt = self._prompt_from_readout(
                self._run_pgm(torch.tensor(chunk_ids), self._design.needs_cache, prompt), tokenizer
            )
            if index == len(chunks) - 1:
                prompt = self.with_demonstrations(prompt, demonstrations, tokenizer)
            yield prompt

    def generate_prompt_from_ids(self, token_ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase) -> GeneratedPrompt:
        """The prompt made from text the PGM reads as it is (1-D token ids, no shot template): the generic-text stage
        of meta-training compresses plain text this way."""
        readout = self._run_pgm(token_ids, self._design.needs_cache)
        return self.with_demonstrations(self._prompt_from_readout(readout, tokenizer), [], tokenizer)

    def generate_prompt_from_read_shots(
        self, shots: ReadShots, tokenizer: PreTrainedTokenizerBase, demonstrations: Any = ()
    ) -> GeneratedPrompt:
        """The prompt of a `lora_scope="padding"` PGM from shots the frozen LM has already read (`read_shots`).

        Meta-training reads the shots once and hands the same keys/values to the PGM and to the teacher.
        """
        if self.metal_config.lora_scope != "padding":
            raise ValueError(
                f"generate_prompt_from_read_shots needs lora_scope='padding'; this PGM has lora_scope="
                f"{self.metal_config.lora_scope!r}, whose PGM reads the shots itself: use generate_prompt."
            )
        readout = self.read_padding(shots, self._design.needs_cache)
        prompt = self._prompt_from_readout(readout, tokenizer)
        return self.with_demonstrations(prompt, demonstrations, tokenizer)

    @property
    def _design(self):
        return get_design(self.metal_config.prompt_design)

    def with_demonstrations(self, prompt: GeneratedPrompt, demonstrations: Any, tokenizer: PreTrainedTokenizerBase) -> GeneratedPrompt:
        """`prompt` with `demonstrations` (shots, possibly none) as the plain demonstrations the LM reads after it, in
        this PGM's template; any it had are replaced."""
        demonstrations = normalize_shots(demonstrations, allow_empty=True)
        ids = self.template.encode_shots(demonstrations, tokenizer)
        device = model_device(self.model)
        return replace(prompt, demonstrations=torch.tensor(ids, dtype=torch.long, device=device),
                       demonstrations_text=self.template.format_shots(demonstrations))

    def refine_prompt(
        self,
        prompt: GeneratedPrompt,
        shots: Any,
        tokenizer: PreTrainedTokenizerBase,
        steps: int = 10,
        lr: Optional[float] = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        seed: int = 0,
    ) -> GeneratedPrompt:
        """A new prompt: `prompt` tuned by `steps` Adam steps on `shots` (prompt tuning started from it), at `lr`
        (None: `refine.DEFAULT_LR`, 5e-2, measured on the dev panel).

        Prefix prompts are tuned per layer (keys and values); weighted_sum and hidden_state prompts as embeddings;
        a discrete prompt as the embeddings of its tokens, so the result is a soft prompt that keeps `token_ids` and
        `text` only for reference. The PGM and the LM are left untouched. Pass the shots the PGM read, not the
        prompt's demonstrations: the LM reads those in its context and would learn to copy their answers
        (`generate_prompt(..., refinement=Refinement(steps))` does this split for you).
        """
        return self.prompt_tuning(prompt, shots, tokenizer, steps, lr, batch_size, seed).run()

    def prompt_tuning(
        self,
        prompt: GeneratedPrompt,
        shots: Any,
        tokenizer: PreTrainedTokenizerBase,
        steps: int = 10,
        lr: Optional[float] = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        seed: int = 0,
    ) -> PromptTuning:
        """`refine_prompt` one Adam step per `step()` (each with LoRA off), for callers that do other work between
        steps: the service serves waiting completions."""
        prompt = self._check_prompt(prompt)
        shots = normalize_shots(shots)
        return PromptTuning(
            self.model, prompt, shots, tokenizer, self.template, steps, lr, batch_size, seed,
            reading=lambda: self._lora(False),
        )

    def _prompt_from_readout(self, readout: PGMReadout, tokenizer: PreTrainedTokenizerBase) -> GeneratedPrompt:
        config = self.metal_config
        payload = self._design.make(readout, self.model, config.temperature, training=self.training)
        return GeneratedPrompt(
            design=config.prompt_design,
            num_tokens=config.num_prompt_tokens,
            base_fingerprint=self.base_fingerprint(),
            pgm_config=json_ready(config.to_dict()),
            text=tokenizer.decode(payload["token_ids"]) if "token_ids" in payload else None,
            **payload,
        )

    def _run_pgm(
        self, chunk_ids: torch.Tensor, needs_cache: bool, previous: Optional[GeneratedPrompt] = None
    ) -> PGMReadout:
        """The PGM over [previous prompt][chunk][padding], read at the padding.

        With `lora_scope="all"` one pass with LoRA on reads everything; with `"padding"` the frozen LM reads the
        shots first, without gradient (`read_shots`), and only the K padding positions run with LoRA on.
        """
        if self.training and _checkpointing(self.model):
            raise ValueError(
                "Gradient checkpointing is not supported while meta-training a MetaL-Prompt PGM: its recomputation "
                "would run the PGM with LoRA off. Disable it with model.get_base_model().gradient_checkpointing_disable()."
            )
        if self.metal_config.lora_scope == "padding":
            return self.read_padding(self.read_shots(chunk_ids, previous), needs_cache)
        shots_embeds, cache = self._shots_input(chunk_ids, previous)
        padding = self._padding_embeds()
        inputs_embeds = torch.cat([shots_embeds, padding]).unsqueeze(0)
        start = self._first_position(cache, inputs_embeds.shape[1] - padding.shape[0])
        with self._lora(True):
            outputs = self.model.base_model(
                inputs_embeds=inputs_embeds,
                position_ids=_positions(start, inputs_embeds.shape[1], inputs_embeds.device),
                **cache_kwargs(self.model.base_model, cache),
                use_cache=needs_cache,
            )
        hidden_states = outputs.last_hidden_state[0, -padding.shape[0] :]
        return PGMReadout(hidden_states=hidden_states, cache=returned_cache(outputs) if needs_cache else None)

    def read_shots(self, chunk_ids: torch.Tensor, previous: Optional[GeneratedPrompt] = None) -> ReadShots:
        """The frozen LM (LoRA off) over [previous prompt][chunk]: the keys and values the padding of a
        `lora_scope="padding"` PGM attends to. Meta-training reuses them for the teacher, which reads the same shots."""
        shots_embeds, cache = self._shots_input(chunk_ids, previous)
        start = self._first_position(cache, shots_embeds.shape[0])
        # Without gradient, except through a previous chunk's prompt made in train mode (folded-in chunks train the
        # PGM through every chunk, as in the "all" scope).
        keep_graph = torch.is_grad_enabled() and previous is not None and self.training
        with torch.set_grad_enabled(keep_graph), self._lora(False):
            outputs = self.model.base_model(
                inputs_embeds=shots_embeds.unsqueeze(0),
                position_ids=_positions(start, shots_embeds.shape[0], shots_embeds.device),
                **cache_kwargs(self.model.base_model, cache),
                use_cache=True,
            )
        return ReadShots(layers=cache_layers(returned_cache(outputs)), next_position=start + shots_embeds.shape[0])

    def read_padding(self, shots: ReadShots, needs_cache: bool) -> PGMReadout:
        """The K padding positions with LoRA on, after the shots' keys and values (`lora_scope="padding"`)."""
        padding = self._padding_embeds().unsqueeze(0)
        cache = cache_from_layers(shots.layers)
        with self._lora(True):
            outputs = self.model.base_model(
                inputs_embeds=padding,
                position_ids=_positions(shots.next_position, padding.shape[1], padding.device),
                **cache_kwargs(self.model.base_model, cache),
                use_cache=True,
            )
        return PGMReadout(hidden_states=outputs.last_hidden_state[0], cache=returned_cache(outputs) if needs_cache else None)

    def _shots_input(
        self, chunk_ids: torch.Tensor, previous: Optional[GeneratedPrompt]
    ) -> tuple[torch.Tensor, Optional[Cache]]:
        """Embeddings of [previous prompt (if embeddings)][chunk], and the previous prompt's cache (if keys/values)."""
        embedding = self.model.get_input_embeddings()
        parts = [embedding(chunk_ids.to(embedding.weight.device))]
        cache = None
        if previous is not None:
            design = get_design(previous.design)
            previous_embeds = design.context_embeds(previous, self.model)
            if previous_embeds is not None:
                parts.insert(0, previous_embeds.to(embedding.weight.dtype))
            cache = design.context_cache(previous, batch_size=1)
        return torch.cat(parts), cache

    def _padding_embeds(self) -> torch.Tensor:
        padding = self.metal_padding[self.active_adapters[0]]()
        return padding.to(self.model.get_input_embeddings().weight.dtype)

    def _first_position(self, cache: Optional[Cache], num_shot_positions: int) -> int:
        """Where the shots start. After a cache, right after it. Otherwise, on a model whose attention depends only on
        position differences, at -len(shots), so the padding sits at 0..K-1 and the queries that read the prompt
        continue at K, after the slots, exactly as at serving (Gist and CCM place them so); else at 0."""
        if cache is not None:
            return cache.get_seq_length()
        return -num_shot_positions if has_shift_invariant_positions(self.model) else 0

    # ------------------------------------------------------------------ the LM reading a prompt

    def _check_prompt(self, prompt: Any) -> GeneratedPrompt:
        if not isinstance(prompt, GeneratedPrompt):
            raise TypeError(f"prompt must be a GeneratedPrompt (from generate_prompt or GeneratedPrompt.load), got {type(prompt).__name__}.")
        check_same_base(prompt.base_fingerprint, self.base_fingerprint())
        return prompt

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        prompt: Optional[GeneratedPrompt] = None,
        **kwargs: Any,
    ) -> Any:
        """With `prompt`: logits and loss over the query positions of [prompt][XL][query]; without: the plain LM."""
        with self._lora(False):
            if prompt is None:
                return self.model(
                    input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels, **kwargs
                )
            if input_ids is None or inputs_embeds is not None:
                raise ValueError("With a prompt, pass the queries as input_ids (not inputs_embeds).")
            kwargs = {key: value for key, value in kwargs.items() if value is not None}
            return forward_with_prompt(self.model, self._check_prompt(prompt), input_ids, attention_mask, labels, **kwargs)

    def generate(self, *args: Any, prompt: Optional[GeneratedPrompt] = None, **kwargs: Any) -> Any:
        """With `prompt`: the query ids followed by the new tokens, as `lm.generate` on the query alone returns them."""
        with self._lora(False):
            if prompt is None:
                return self.model.generate(*args, **kwargs)
            return generate_with_prompt(self.model, self._check_prompt(prompt), *args, **kwargs)

    # ------------------------------------------------------------------ LoRA operations that would break the PGM

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> Any:
        raise _not_for_a_pgm("merge_and_unload", "it would fold the PGM's LoRA into the LM, which must stay frozen")

    def unload(self, *args: Any, **kwargs: Any) -> Any:
        raise _not_for_a_pgm(
            "unload", "it would silently drop the PGM's LoRA and its trainable padding (call remove_pgm() to mean that)"
        )

    def remove_pgm(self) -> PreTrainedModel:
        """The base LM with the PGM taken out: its LoRA layers replaced by the original ones and its padding dropped,
        the LM's weights untouched (nothing is merged). For reusing the LM object after the PGM is no longer wanted."""
        lm = super().unload()
        for name in list(self.metal_padding):
            del self.metal_padding[name]
        return lm

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise _not_for_a_pgm("merge_adapter", "it would fold the PGM's LoRA into the LM, which must stay frozen")

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise _not_for_a_pgm("add_weighted_adapter", "it would mix LoRA weights but not the PGMs' paddings")

    # ------------------------------------------------------------------ save / load of the padding

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """PEFT finds the padding (a per-adapter container on the tuner) by itself, but only strips the adapter name
        from keys of tuner layers; without this the checkpoint keys would carry it and not load under another name."""
        padding_key = f"{PADDING_ATTRIBUTE}.{adapter_name}."
        if padding_key in key:
            return key.replace(padding_key, f"{PADDING_ATTRIBUTE}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)


def is_pgm_parameter(name: str) -> bool:
    """Whether a parameter name (or state-dict key) is the PGM's (LoRA or the padding) rather than the LM's: PEFT's own
    rule for a tuner's parameters (its prefix in the name), plus the padding."""
    return MetaLPromptModel.prefix in name or PADDING_ATTRIBUTE in name


@dataclass
class ReadShots:
    """Per-layer keys/values (batch 1) of the frozen LM over the generation shots, and the next free position."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    next_position: int

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[2]

    @property
    def first_position(self) -> int:
        return self.next_position - self.length


def _not_for_a_pgm(operation: str, why: str) -> TypeError:
    return TypeError(
        f"{operation} is not supported for a MetaL-Prompt PGM: {why}. The base LM is `model.get_base_model()` used "
        "inside `model.base_model.lm_only()`; a prompt is read by `model(prompt=...)` / `model.generate(prompt=...)`; "
        "`model.base_model.remove_pgm()` gives the LM back without the PGM."
    )


def _positions(start: int, length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + length, device=device).unsqueeze(0)


def _checkpointing(lm: PreTrainedModel) -> bool:
    """Whether activation (gradient) checkpointing is on; transformers renamed the flag in v5."""
    flag = getattr(type(lm), "is_activation_checkpointing", None)
    return bool(lm.is_activation_checkpointing if flag is not None else getattr(lm, "is_gradient_checkpointing", False))


def json_ready(value: Any) -> Any:
    """The config as plain JSON values (sets sorted, enums by value), as stored in a prompt's metadata."""
    return json.loads(json.dumps(value, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))
