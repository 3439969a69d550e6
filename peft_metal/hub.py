"""Sharing a PGM on the Hub with its MetaL-Prompt model card.

`model.push_to_hub(repo)` works for a PGM as for any PEFT model, but transformers replaces the README.md that
`save_pretrained` wrote with the repository's existing card (or a generic one), so the card loses what the PGM is for
(base model, design, K, training facts). `push_pgm_to_hub` uploads exactly what `save_pretrained` writes.
"""

from __future__ import annotations

import tempfile
from typing import Any, Optional

from huggingface_hub import HfApi
from peft import PeftModel

from .metal_prompt import MetaLPromptConfig


def push_pgm_to_hub(
    model: PeftModel,
    repo_id: str,
    *,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    commit_message: str = "Upload MetaL-Prompt PGM",
) -> Any:
    """Save the PGM (adapter safetensors, config, model card) and upload that folder as it is; returns the commit."""
    if not isinstance(model, PeftModel) or not isinstance(model.peft_config.get(model.active_adapter), MetaLPromptConfig):
        raise TypeError(
            f"push_pgm_to_hub shares MetaL-Prompt PGMs (a PeftModel over a MetaLPromptConfig); got {type(model).__name__}. "
            "Other PEFT models share with model.push_to_hub(repo_id)."
        )
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, save_embedding_layers=False)  # see training.trainer.export_pgm
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr, commit_message=commit_message
        )
