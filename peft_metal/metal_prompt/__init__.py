"""MetaL-Prompt as a PEFT method: config, tuner (the PGM), trainable padding, the prompt artifact and its reading."""

from .config import MetaLPromptConfig
from .model import MetaLPromptModel
from .prompt import GeneratedPrompt
from .refine import Refinement
from .template import ShotTemplate, normalize_shots

__all__ = [
    "GeneratedPrompt", "MetaLPromptConfig", "MetaLPromptModel", "Refinement", "ShotTemplate", "normalize_shots"
]
