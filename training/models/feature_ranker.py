"""The feature ranker: a DCN-v2 over :data:`core.ranking_features.FEATURES`, one click logit
per (user, candidate).

DCN-v2 (Wang et al., 2021): the standardised features ``x0`` go through ``L`` cross layers
``x_{l+1} = x0 * (W_l x_l + b_l) + x_l`` (explicit feature interactions, e.g. "content
similarity matters more for long histories") beside a small MLP; a linear head on both gives
the logit. Standardisation is part of the model (buffers), so the exported ONNX graph takes
the raw feature row. It is tiny (a few thousand parameters): one batched call for a few
hundred candidates costs well under a millisecond, where the cross-encoder it replaces in
the default path costs a BERT pass per candidate.

Saved format (what :func:`load_feature_ranker` and the exporter read)::

    <out>/feature_ranker/
        model.pt            state dict
        config.json         {"features": [...], "cross_layers", "hidden", "dropout"}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from core.ranking_features import FEATURES

CONFIG_FILE = "config.json"
# Features are scaled to ~[0, 1]; one that barely varies in training is left unscaled rather
# than blown up (a 1e-5 spread would turn fp32 rounding into a visible score difference).
MIN_STD = 1e-3
WEIGHTS_FILE = "model.pt"


class DCNv2(nn.Module):
    """Cross network + deep network on standardised features -> a logit per row."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        n_features: int = len(FEATURES),
        cross_layers: int = 2,
        hidden: Sequence[int] = (64, 32),
        dropout: float = 0.1,
        sequence: bool = False,
        served: bool = True,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.cross = nn.ModuleList(nn.Linear(n_features, n_features) for _ in range(cross_layers))
        layers: list[nn.Module] = []
        width = n_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        self.deep = nn.Sequential(*layers)
        self.head = nn.Linear(n_features + width, 1)
        self.config = {
            "features": list(FEATURES),
            "cross_layers": cross_layers,
            "hidden": list(hidden),
            "dropout": dropout,
            # trained with the sequence model as a source and feature: its release serves it
            "sequence": sequence,
            # false: the retrieval order did as well on the validation windows, so its release
            # re-ranks nothing (training/release_choice.py); kept for its metrics
            "served": served,
        }

    def set_scaling(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise with the training features' statistics (near-constant: std 1)."""
        self.mean.copy_(mean)
        self.std.copy_(torch.where(std > MIN_STD, std, torch.ones_like(std)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch,)``."""
        x0 = (features - self.mean) / self.std
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        return self.head(torch.cat([x, self.deep(x0)], dim=-1)).squeeze(-1)


class FeatureScorer(nn.Module):
    """The ranker as served: ``(batch, 1)`` logit and probability, like the cross-encoder."""

    def __init__(self, model: DCNv2) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit = self.model(features).unsqueeze(-1)
        return logit, torch.sigmoid(logit)


def save_feature_ranker(model: DCNv2, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(model.config, indent=2) + "\n")


def is_served(path: Path) -> bool:
    """Whether the feature ranker saved at ``path`` is served by its release (one saved
    before the choice existed is)."""
    return bool(json.loads((path / CONFIG_FILE).read_text()).get("served", True))


def uses_sequence(path: Path) -> bool:
    """Whether the feature ranker saved at ``path`` was trained with the sequence model's
    source and features: then its release must serve that model, else it must not (the
    features would reach it unlike in training)."""
    return bool(json.loads((path / CONFIG_FILE).read_text()).get("sequence", False))


def load_feature_ranker(path: Path) -> DCNv2:
    """The saved model; refuses one trained on another feature list (a silent mismatch
    would score every candidate with the wrong inputs)."""
    config = json.loads((path / CONFIG_FILE).read_text())
    if list(config["features"]) != list(FEATURES):
        raise ValueError(
            f"{path} was trained on features {config['features']}, this code builds "
            f"{list(FEATURES)}: retrain or use the matching code"
        )
    model = DCNv2(
        len(FEATURES),
        config["cross_layers"],
        config["hidden"],
        config["dropout"],
        bool(config.get("sequence", False)),
        bool(config.get("served", True)),
    )
    model.load_state_dict(torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return model.eval()
