"""Serving MetaL-Prompt: the persistent prompt store (`store.py`); the HTTP service is `app.create_app`
(routes in `routes/`).

Only the store is imported here, so using it needs none of the optional `serve` dependencies.
"""

from .store import DamagedPromptError, PromptNotFoundError, PromptStore, prompt_key

__all__ = ["DamagedPromptError", "PromptNotFoundError", "PromptStore", "prompt_key"]
