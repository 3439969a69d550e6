"""peft-metal: MetaL-Prompt for Hugging Face PEFT.

Importing this package registers the `metal_prompt` method with PEFT, so `peft.get_peft_model`,
`PeftModel.from_pretrained` and `AutoPeftModelForCausalLM` work with `MetaLPromptConfig`.
"""

from .registration import check_peft_version

check_peft_version()

from .metal_prompt import GeneratedPrompt, MetaLPromptConfig, MetaLPromptModel, Refinement, ShotTemplate  # noqa: E402
from .registration import register  # noqa: E402

register()

from .hub import push_pgm_to_hub  # noqa: E402
from .pgm import get_peft_model, load_pretrained_pgm  # noqa: E402  (PEFT's get_peft_model, quieted: see pgm.py)

__version__ = "0.1.0"
__all__ = [
    "GeneratedPrompt", "MetaLPromptConfig", "MetaLPromptModel", "Refinement", "ShotTemplate", "get_peft_model",
    "load_pretrained_pgm", "push_pgm_to_hub",
]
