"""The model card (README.md) of a saved PGM: what it is, how it was made, how to load it, and its dev results.

PEFT writes a generic template before the config is saved; `write_model_card` replaces it whole, since most of that
template would stay unfilled ("More Information Needed") for a PGM. Card metadata follows the Hub's conventions
(`library_name`, `base_model`, `tags`, `license`, `datasets`, `eval_results`), so the Hub lists the PGM as an adapter
of its base model.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

if TYPE_CHECKING:
    from .config import MetaLPromptConfig

SECTION_HEADING = "## MetaL-Prompt"
PAPER = (
    "Ha, Lee, Han, Chun: *Meta-Learning of Prompt Generation for Lightweight Prompt Engineering on "
    "Language-Model-as-a-Service*, Findings of EMNLP 2023 "
    "([ACL Anthology](https://aclanthology.org/search/?q=Meta-Learning+of+Prompt+Generation+for+Lightweight+Prompt+Engineering))"
)
LICENSE = "apache-2.0"
BIGBENCH_DATASET, METAICL_DATASET = "bigbench", "metaicl"


def card_data(config: MetaLPromptConfig) -> ModelCardData:
    base = config.base_model_name_or_path
    tags = ["peft-metal", "metal-prompt", "prompt-generation", "lora", "transformers"]
    if base:
        tags.insert(0, f"base_model:adapter:{base}")
    return ModelCardData(
        library_name="peft",
        base_model=base,
        pipeline_tag="text-generation",
        license=LICENSE,
        datasets=_datasets(config),
        tags=tags,
        model_name=f"MetaL-Prompt PGM ({config.prompt_design}, K={config.num_prompt_tokens})",
        eval_results=_eval_results(config) or None,
    )


def _training_settings(config: MetaLPromptConfig) -> dict[str, Any]:
    summary = config.training_summary or {}
    return json.loads(summary.get("settings") or "{}")  # the trainer records its settings as one JSON string


def _datasets(config: MetaLPromptConfig) -> Optional[list[str]]:
    """The corpora a PGM was meta-trained on: MetaICL's tasks, BIG-bench's (a run on neither MetaICL nor a `task_dir`);
    nothing for an untrained one or one trained on a `task_dir` of one's own tasks alone, whose card should not claim
    a dataset it never saw."""
    if not config.training_summary:
        return None
    settings = _training_settings(config)
    datasets = [METAICL_DATASET] if settings.get("metaicl_dir") else []
    if not settings.get("metaicl_dir") and not settings.get("task_dir"):
        datasets.append(BIGBENCH_DATASET)
    return datasets or None


def _trained_on(settings: dict[str, Any]) -> Optional[str]:
    """Where the run's episodes came from, in words, and the PGM it continued: the line of the card a reader looks for
    first, which the settings record only as scattered fields."""
    sources = []
    if settings.get("metaicl_dir"):
        tasks = settings.get("metaicl_tasks")
        named = _count(len(tasks), "train task") if tasks else "every train task"
        sources.append(f"MetaICL's tasks ({named} of `{settings['metaicl_dir']}`)")
    if settings.get("task_dir"):
        named = _count(len(settings["tasks"]), "task") if settings.get("tasks") else "every task"
        sources.append(f"BIG-bench-format task folders ({named} under `{settings['task_dir']}`)")
    if settings and not sources:
        sources.append("BIG-bench's train split")
    if not sources:
        return None
    start = f", continuing `{settings['init_from']}`" if settings.get("init_from") else ", from scratch"
    return " and ".join(sources) + start


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


# The dataset each panel's figures were measured on; a result's label names its panel ("metal (dev-panel, seeds 13)").
PANEL_DATASETS = {
    "dev-panel": (METAICL_DATASET, "MetaICL dev tasks (peft-metal)"),
    "dev-panel-tasks": ("bigbench-format", "BIG-bench-format dev tasks (peft-metal)"),
    "bigbench-panel": (BIGBENCH_DATASET, "BIG-bench dev panel (peft-metal)"),
    "bigbench-panel-confirm": (BIGBENCH_DATASET, "BIG-bench dev panel (peft-metal)"),
}


def panel_of(label: str) -> Optional[str]:
    """The panel a dev result's label names (`labelled_means` writes "method (panel, seeds ...)"), None without one."""
    if not label.endswith(")") or " (" not in label:
        return None
    where = label[label.rindex(" (") + 2 : -1].split(", ")[0]
    return where if where in PANEL_DATASETS else None


def _eval_results(config: MetaLPromptConfig) -> list[EvalResult]:
    """The dev figures recorded in the training summary (`dev_results`: method -> accuracy, or macro-F1 where the label
    says so), each on the dataset of the panel its label names; a figure with no panel is taken to be on the corpus the
    PGM was meta-trained on (MetaICL's, else BIG-bench's)."""
    results = (config.training_summary or {}).get("dev_results") or {}
    unnamed = PANEL_DATASETS["dev-panel" if _training_settings(config).get("metaicl_dir") else "bigbench-panel"]

    measured = []
    for method, value in results.items():
        dataset_type, dataset_name = PANEL_DATASETS.get(panel_of(method), unnamed)
        measured.append(EvalResult(
            task_type="text-generation",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            metric_type="f1" if "macro-F1" in method else "accuracy",
            metric_name=method if "macro-F1" in method else f"{method} accuracy",
            metric_value=float(value),
        ))
    return measured


def render_section(config: MetaLPromptConfig) -> str:
    """Markdown that tells a reader of the Hub page what this PGM is, how it was made and how to load it."""
    base = config.base_model_name_or_path
    base_text = f"`{base}`" if base else "not recorded (the PGM was saved from a model without a name)"
    base_id = json.dumps(base) if base else "BASE_MODEL_ID  # the model this PGM was trained on"
    lines = [
        SECTION_HEADING,
        "",
        "A prompt generation model (PGM) made with [peft-metal](https://pypi.org/project/peft-metal/), after "
        f"{PAPER}: LoRA on the frozen base LM plus trainable padding. It turns a few examples of a task into a prompt "
        "in one forward pass; the base LM then reads that prompt before every request of the task.",
        "",
        f"- Base model: {base_text}",
        f"- Prompt design: `{config.prompt_design}`",
        f"- Prompt length K: {config.num_prompt_tokens}",
        f"- LoRA scope: `{config.lora_scope}`",
        f"- LoRA rank: {config.r}, alpha: {config.lora_alpha}, target modules: "
        f"{sorted(config.target_modules) if config.target_modules else 'per architecture'}",
        f"- Padding reparameterization: `{config.padding_reparameterization}`",
        f"- Shot template: input prefix {json.dumps(config.input_prefix)}, output prefix "
        f"{json.dumps(config.output_prefix)}, separator {json.dumps(config.shot_separator)}",
        f"- License: {LICENSE}",
        "",
        "### Usage",
        "",
        "`import peft_metal` registers the method with PEFT; without it `PeftModel.from_pretrained` does not know it.",
        "",
        "```python",
        "import peft_metal  # registers the MetaL-Prompt method with PEFT",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"base_lm = AutoModelForCausalLM.from_pretrained({base_id})",
        f"tokenizer = AutoTokenizer.from_pretrained({base_id})",
        "model = PeftModel.from_pretrained(base_lm, REPO_OR_FOLDER)",
        'prompt = model.generate_prompt([("Great film!", "positive"), ("Boring.", "negative")], tokenizer=tokenizer)',
        "```",
        "",
        "### Meta-training",
        "",
    ]
    summary = dict(config.training_summary or {})
    dev_results = summary.pop("dev_results", None)
    trained_on = _trained_on(_training_settings(config))
    lines += [f"- Trained on: {trained_on}"] if trained_on else []
    lines += [f"- {key}: {value}" for key, value in summary.items()] or ["- Not meta-trained yet."]
    if dev_results:
        lines += ["", "### Dev results", ""]
        panels = sorted({panel for panel in map(panel_of, dev_results) if panel})
        if panels:
            lines += ["Measured on " + "; ".join(f"`{panel}`: {PANEL_DATASETS[panel][1]}" for panel in panels) + ".", ""]
        lines += [f"- {method}: {value:.3f}" for method, value in dev_results.items()]
    return "\n".join(lines)


def write_model_card(readme_path: str, config: MetaLPromptConfig) -> None:
    """Write the whole card: the Hub metadata and the MetaL-Prompt section (nothing left from PEFT's template)."""
    card = ModelCard.from_template(card_data(config), template_str="---\n{{ card_data }}\n---\n\n{{ body }}\n",
                                   body=render_section(config))
    card.save(readme_path)


def write_model_card_beside(save_directory: str, config: MetaLPromptConfig) -> None:
    """The card of a PGM saved in `save_directory`, as its README.md (replacing PEFT's generic one)."""
    write_model_card(os.path.join(save_directory, "README.md"), config)


def card_metadata(card_text: str) -> dict[str, Any]:
    """The YAML metadata of a card's text (for tests and tools that check a saved card)."""
    return ModelCard(card_text).data.to_dict()
