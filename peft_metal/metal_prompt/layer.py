"""The trainable padding: K embeddings appended after the generation shots, reparameterized as in P-tuning."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class TrainablePadding(nn.Module):
    """Produces the K input embeddings at which the PGM writes the prompt.

    The raw embeddings start as the LM's own embeddings of random vocabulary tokens, so the PGM first sees inputs
    from its training distribution. With `"lstm"` (a bidirectional LSTM then an MLP, as P-tuning does) or `"mlp"` the
    output is `raw + head(raw)`; the head's last layer starts at zero so training starts from those real embeddings
    and the head only learns the correction. With `"none"` the raw embeddings are used as they are.
    """

    def __init__(
        self,
        num_tokens: int,
        init_embeddings: torch.Tensor,
        reparameterization: str = "lstm",
        hidden_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        embed_dim = init_embeddings.shape[-1]
        hidden_size = hidden_size or embed_dim
        self.reparameterization = reparameterization
        self.embedding = nn.Parameter(init_embeddings.detach().clone().float())
        if reparameterization == "lstm":
            self.lstm = nn.LSTM(embed_dim, hidden_size, batch_first=True, bidirectional=True)
            self.head = nn.Sequential(
                nn.Linear(2 * hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, embed_dim)
            )
        elif reparameterization == "mlp":
            self.head = nn.Sequential(
                nn.Linear(embed_dim, hidden_size), nn.ReLU(), nn.Linear(hidden_size, embed_dim)
            )
        elif reparameterization != "none":
            raise ValueError(f"Unknown padding reparameterization {reparameterization!r}: use 'lstm', 'mlp' or 'none'.")
        if reparameterization != "none":
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)
        self._cached: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        return self.embedding.shape[0]

    def forward(self) -> torch.Tensor:
        """The K x hidden padding embeddings; computed once and reused while nothing can change them."""
        if self.training or torch.is_grad_enabled():
            self._cached = None
            return self.reparameterize()
        if self._cached is None:
            self._cached = self.reparameterize().detach()
        return self._cached

    def reparameterize(self) -> torch.Tensor:
        raw = self.embedding
        if self.reparameterization == "none":
            return raw
        features = raw.unsqueeze(0)
        if self.reparameterization == "lstm":
            features = self.lstm(features)[0]
        return raw + self.head(features).squeeze(0)

    def train(self, mode: bool = True) -> "TrainablePadding":
        self._cached = None
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._cached = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse: bool = True):
        self._cached = None
        return super()._apply(fn, recurse)
