"""`GeneratedPrompt`: what a PGM makes for a task, stored once and read by the frozen LM for every later request."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from transformers import DynamicCache

from ..designs import DESIGNS, EMBEDDINGS, KEYS_VALUES, get_design

FORMAT_NAME = "peft-metal-prompt"
FORMAT_VERSION = "1"
CHECKSUM_KEY = "sha256"
TENSOR_FIELDS = ("token_ids", "embeds", "keys", "values", "demonstrations")
METADATA_FIELDS = ("format", "format_version", "design", "num_tokens", "base_fingerprint", "pgm_config", "text",
                   "demonstrations_text", "refinement", CHECKSUM_KEY)


@dataclass
class GeneratedPrompt:
    """A task prompt and everything needed to read it safely.

    The payload is what the design declares (`PromptDesign.payload`): `token_ids` (K vocabulary ids), `embeds`
    (K x hidden) or `keys`/`values` (layers x kv-heads x K x head-dim). `demonstrations` holds the token ids of the
    shots kept as plain demonstrations (XL), placed between the prompt and each query. `refinement` lists the
    gradient refinements the prompt went through (`refine_prompt`: steps, lr, batch size, seed, shots), oldest first.
    """

    design: str
    num_tokens: int
    base_fingerprint: dict[str, Any]
    pgm_config: dict[str, Any]
    demonstrations: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    token_ids: Optional[torch.Tensor] = None
    embeds: Optional[torch.Tensor] = None
    keys: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    text: Optional[str] = None
    demonstrations_text: str = ""
    refinement: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.design not in DESIGNS:
            raise ValueError(f"Unknown prompt design {self.design!r}; expected one of {list(DESIGNS)}.")
        for name, token_axis in DESIGNS[self.design].payload.items():
            value = getattr(self, name)
            if value is None:
                raise ValueError(f"A {self.design} prompt needs `{name}`, which is missing.")
            if value.dim() <= token_axis or value.shape[token_axis] != self.num_tokens:
                raise ValueError(
                    f"`{name}` of shape {tuple(value.shape)} does not hold {self.num_tokens} prompt positions."
                )
        if not isinstance(self.refinement, list) or not all(isinstance(record, dict) for record in self.refinement):
            raise ValueError(f"`refinement` must be a list of dicts (one per refinement), got {self.refinement!r}.")
        if self.demonstrations.dim() != 1:
            raise ValueError(f"`demonstrations` must be 1-D token ids, got shape {tuple(self.demonstrations.shape)}.")

    @property
    def is_text(self) -> bool:
        """Plain text any LM service can read: vocabulary tokens, not refined (refinement tunes their embeddings)."""
        return get_design(self.design).is_text and self.embeds is None

    @property
    def num_demonstration_tokens(self) -> int:
        return int(self.demonstrations.numel())

    @property
    def context_length(self) -> int:
        """Positions the prompt and its demonstrations take in the LM's context, before each query."""
        return self.num_tokens + self.num_demonstration_tokens

    @property
    def past_key_values(self) -> DynamicCache:
        """A fresh cache over the prefix (batch 1); fresh each time, so nothing that extends it touches the prompt."""
        design = get_design(self.design)
        if design.reads_as != KEYS_VALUES:
            kv_designs = ", ".join(name for name, other in DESIGNS.items() if other.reads_as == KEYS_VALUES)
            raise ValueError(f"Only keys/values prompts ({kv_designs}) carry past_key_values; this one is {self.design}.")
        return design.context_cache(self, batch_size=1)

    def to_prompt_embeds(self, lm: Any, input_ids: Any) -> torch.Tensor:
        """The input embeddings of [prompt][demonstrations][query] that engines taking embeddings accept (vLLM's
        `prompt_embeds` with `--enable-prompt-embeds`, SGLang's `input_embeds`): the LM given them computes what it
        computes reading this prompt. `input_ids`: one query (1-D, gives T x hidden) or an unpadded batch (2-D, gives
        batch x T x hidden).

        A prefix prompt is keys and values for every layer, not embeddings; no engine takes those, so it raises.
        """
        prompt_embeds = get_design(self.design).context_embeds(self, lm)
        if prompt_embeds is None:
            embedding_designs = ", ".join(name for name, design in DESIGNS.items() if design.reads_as == EMBEDDINGS)
            raise ValueError(
                f"A {self.design} prompt is keys and values for every layer, not input embeddings: engines that take "
                "embeddings (vLLM prompt_embeds, SGLang input_embeds) cannot read it. Serve it with `peft-metal "
                f"serve`, or make the prompt with an embedding design ({embedding_designs})."
            )
        embedding = lm.get_input_embeddings()
        ids = torch.as_tensor(input_ids, device=embedding.weight.device)
        if ids.dim() not in (1, 2) or ids.is_floating_point():
            raise ValueError(f"input_ids must be 1-D or 2-D integer token ids, got shape {tuple(ids.shape)} ({ids.dtype}).")
        context = torch.cat([prompt_embeds.to(embedding.weight.dtype), embedding(self.demonstrations.to(ids.device))])
        if ids.dim() == 1:
            return torch.cat([context, embedding(ids)])
        return torch.cat([context.unsqueeze(0).expand(ids.shape[0], -1, -1), embedding(ids)], dim=1)

    def detach(self) -> "GeneratedPrompt":
        """The same prompt without the autograd graph of its making."""
        return replace(self, **{name: t.detach() for name, t in self._tensors().items()})

    def to(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None) -> "GeneratedPrompt":
        """Move the tensors; `dtype` applies to floating-point payloads only (token ids stay integers)."""
        moved = {}
        for name, tensor in self._tensors().items():
            moved[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
        return replace(self, **moved)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write one safetensors file: the design's payload, the demonstrations and JSON metadata."""
        design = get_design(self.design)
        present = self._tensors()
        tensors = {name: present[name] for name in (*design.payload, *design.optional_payload) if name in present}
        tensors["demonstrations"] = self.demonstrations
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        metadata = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "design": self.design,
            "num_tokens": str(self.num_tokens),
            "base_fingerprint": json.dumps(self.base_fingerprint, sort_keys=True),
            "pgm_config": json.dumps(self.pgm_config, sort_keys=True),
            "text": json.dumps(self.text),
            "demonstrations_text": json.dumps(self.demonstrations_text),
        }
        if self.refinement:  # only then: an unrefined prompt stays readable by versions that predate the field
            metadata["refinement"] = json.dumps(self.refinement, sort_keys=True)
        metadata[CHECKSUM_KEY] = _content_checksum(metadata, tensors)
        # Serialized in memory and written here, not with `save_file`: safetensors >= 0.8 writes through a temporary
        # file of its own naming next to the target, which a writer killed mid-save leaves behind where the prompt
        # store (which writes and renames its own temporary files) cannot tell it from someone else's file.
        with open(os.fspath(path), "wb") as file:
            file.write(safetensors_bytes(tensors, metadata=metadata))

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> "GeneratedPrompt":
        """Read a file written by `save`; anything else (pickle, a damaged file, another format) raises ValueError."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No prompt file at {path}.")
        try:
            with safe_open(path, framework="pt", device=str(device)) as reader:
                metadata = reader.metadata() or {}
                tensors = {name: reader.get_tensor(name) for name in reader.keys()}
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(f"{path} is not a readable safetensors prompt file ({error}).") from error
        if metadata.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is a safetensors file but not a peft-metal prompt (no '{FORMAT_NAME}' metadata).")
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} uses prompt format version {metadata.get('format_version')}; this peft-metal reads "
                f"version {FORMAT_VERSION}. Regenerate the prompt or upgrade peft-metal."
            )
        unknown = set(tensors) - set(TENSOR_FIELDS)
        if unknown:
            raise ValueError(f"{path} holds unexpected tensors {sorted(unknown)}.")
        # Every key is known, so damage cannot rename the checksum away and pass as a file from before checksums.
        unknown = set(metadata) - set(METADATA_FIELDS)
        if unknown:
            raise ValueError(f"{path} is damaged or foreign: unexpected metadata {sorted(unknown)}.")
        stored_checksum = metadata.pop(CHECKSUM_KEY, None)  # files written before checksums have none
        if stored_checksum is not None and stored_checksum != _content_checksum(metadata, tensors):
            raise ValueError(f"{path} is damaged: its contents no longer match the checksum written with them.")
        try:
            return cls(
                design=metadata["design"],
                num_tokens=int(metadata["num_tokens"]),
                base_fingerprint=json.loads(metadata["base_fingerprint"]),
                pgm_config=json.loads(metadata["pgm_config"]),
                text=json.loads(metadata["text"]),
                demonstrations_text=json.loads(metadata["demonstrations_text"]),
                refinement=json.loads(metadata.get("refinement", "[]")),
                **tensors,
            )
        except (KeyError, json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{path} has damaged prompt metadata ({error!r}).") from error

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}


def _content_checksum(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the metadata and every tensor's name, dtype, shape and bytes: any change to a saved prompt shows."""
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
