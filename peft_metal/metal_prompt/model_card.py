"""The MetaL-Prompt section of a saved PGM's model card (README.md)."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from huggingface_hub import ModelCard

if TYPE_CHECKING:
    from .config import MetaLPromptConfig

SECTION_HEADING = "## MetaL-Prompt"


def render_section(config: MetaLPromptConfig) -> str:
    """Markdown that tells a reader of the Hub page what this PGM is and how it was made."""
    lines = [
        SECTION_HEADING,
        "",
        "A prompt generation model (PGM) made with [peft-metal](https://pypi.org/project/peft-metal/): LoRA on the "
        "frozen base LM plus trainable padding. It turns a few examples of a task into a prompt in one forward pass.",
        "",
        f"- Base model: `{config.base_model_name_or_path}`",
        f"- Prompt design: `{config.prompt_design}`",
        f"- Prompt length K: {config.num_prompt_tokens}",
        f"- LoRA rank: {config.r}, alpha: {config.lora_alpha}, target modules: "
        f"{sorted(config.target_modules) if config.target_modules else 'per architecture'}",
        f"- Padding reparameterization: `{config.padding_reparameterization}`",
        f"- Shot template: input prefix {json.dumps(config.input_prefix)}, output prefix "
        f"{json.dumps(config.output_prefix)}, separator {json.dumps(config.shot_separator)}",
    ]
    if config.training_summary:
        lines += ["", "### Meta-training", ""]
        lines += [f"- {key}: {value}" for key, value in config.training_summary.items()]
    else:
        lines += ["", "### Meta-training", "", "- Not meta-trained yet."]
    lines += [
        "",
        "```python",
        "import peft_metal  # registers the method with PEFT",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_lm, REPO_OR_FOLDER)",
        "prompt = model.generate_prompt(shots, tokenizer=tokenizer)",
        "```",
    ]
    return "\n".join(lines)


def add_metal_section(readme_path: str, config: MetaLPromptConfig) -> None:
    """Replace (or add) the MetaL-Prompt section of an existing model card; leave the rest as PEFT wrote it."""
    if not os.path.exists(readme_path):
        return
    card = ModelCard.load(readme_path)
    text = card.text
    if SECTION_HEADING in text:
        before, _, after = text.partition(SECTION_HEADING)
        next_heading = after.find("\n## ")
        text = before + (after[next_heading + 1 :] if next_heading >= 0 else "")
    card.text = render_section(config) + "\n\n" + text.lstrip()
    tags = set(card.data.tags or []) | {"metal-prompt", "peft-metal"}
    card.data.tags = sorted(tags)
    card.save(readme_path)
