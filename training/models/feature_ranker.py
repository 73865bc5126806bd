"""The feature ranker: a DCN-v2 over :data:`core.ranking_features.FEATURES`, one click logit
per (user, candidate).

DCN-v2 (Wang et al., 2021): the standardised features ``x0`` go through ``L`` cross layers
``x_{l+1} = x0 * (W_l x_l + b_l) + x_l`` (explicit feature interactions, e.g. "content
similarity matters more for long histories") beside a small MLP; a linear head on both gives
the logit. Standardisation is part of the model (buffers), so the exported ONNX graph takes
the raw feature row. It is tiny (a few thousand parameters): one batched call for a few
hundred candidates costs well under a millisecond, where the cross-encoder it replaces in
the default path costs a BERT pass per candidate.

A release may serve a seed ensemble instead (:class:`RankerEnsemble`): a few DCN-v2s trained
side by side, the served logit their mean; still one small graph and one batched call.

Saved format (what :func:`load_feature_ranker` and the exporter read)::

    <out>/feature_ranker/
        model.pt            state dict
        config.json         {"features": [...], "cross_layers", "hidden", "dropout",
                             "members" (absent: one DCN-v2)}
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

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
        dropout: float = 0.0,
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
        self.config: dict[str, Any] = {
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

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DCNv2:
        """An untrained DCN-v2 of a saved ``config.json``'s settings."""
        return cls(
            len(config["features"]),
            int(config["cross_layers"]),
            list(config["hidden"]),
            float(config["dropout"]),
            bool(config.get("sequence", False)),
            bool(config.get("served", True)),
        )

    def set_scaling(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise with the training features' statistics (near-constant: std 1)."""
        self.mean.copy_(mean)
        self.std.copy_(_spread(std))

    def forward(self, features: torch.Tensor, members: bool = False) -> torch.Tensor:
        """Logits of shape ``(batch,)``; ``members``: as one member's, ``(1, batch)``, the
        shape :meth:`RankerEnsemble.forward` gives training's loss."""
        x0 = (features - self.mean) / self.std
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        logits = self.head(torch.cat([x, self.deep(x0)], dim=-1)).squeeze(-1)
        return logits.unsqueeze(0) if members else logits


class RankerEnsemble(nn.Module):
    """Several DCN-v2s of one configuration, each from its own initialisation and trained on
    its own loss over the same batches (``forward(..., members=True)``); it serves the mean of their
    logits. One ranker's order moves with its seed (NDCG@10 0.183-0.192 over three seeds on a
    MovieLens validation window); three members rank about as well, and two of them trained
    with different seeds share 93-94% of a user's top 10 where two single rankers share
    89-90% (training/evaluation/FINDINGS.md).

    The members' weights are stacked, ``(members, out, in)`` a layer, and every layer is one
    batched matrix product for all of them: three members train in about 1.9x one DCN-v2's
    time, where a loop over them took 2.5x. :meth:`member` gives a member back as its own
    DCN-v2."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, members: Sequence[DCNv2]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
        first = members[0]
        self.config: dict[str, Any] = {**first.config, "members": len(members)}
        self.register_buffer("mean", first.mean.clone())
        self.register_buffer("std", first.std.clone())

        cross, deep, head = zip(*(_linears(m) for m in members), strict=True)
        self.cross, self.deep, self.head = _stacked(cross), _stacked(deep), _stacked(head)
        self.dropout = nn.Dropout(float(first.config["dropout"]))

    def set_scaling(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """As :meth:`DCNv2.set_scaling`: one scaling, shared by the members."""
        self.mean.copy_(mean)
        self.std.copy_(_spread(std))

    def forward(self, features: torch.Tensor, members: bool = False) -> torch.Tensor:
        """Logits of shape ``(batch,)``: the members' mean; ``members``: each member's,
        ``(members, batch)``, what training's loss reads (through ``forward``, so that a DDP
        wrapper sees the pass). Each member's rows go through its own weights exactly as
        through its DCN-v2."""
        x0 = ((features - self.mean) / self.std).expand(int(self.config["members"]), -1, -1)
        x = x0
        for w, b in _pairs(self.cross):
            x = x0 * _linear(x, w, b) + x
        h = x0
        for w, b in _pairs(self.deep):
            h = self.dropout(torch.relu(_linear(h, w, b)))
        (w, b), *_ = _pairs(self.head)
        logits = _linear(torch.cat([x, h], dim=-1), w, b).squeeze(-1)
        return logits if members else logits.mean(dim=0)

    def member(self, index: int) -> DCNv2:
        """Member ``index`` as its own DCN-v2 (a copy of its weights and the scaling)."""
        net = DCNv2.from_config(self.config)
        layers = [layer for group in _linears(net) for layer in group]
        weights = [*_pairs(self.cross), *_pairs(self.deep), *_pairs(self.head)]
        with torch.no_grad():
            for layer, (w, b) in zip(layers, weights, strict=True):
                layer.weight.copy_(w[index])
                layer.bias.copy_(b[index])
            net.set_scaling(self.mean, self.std)
        return net.train(self.training)


def _spread(std: torch.Tensor) -> torch.Tensor:
    """The standardisation's spread: a feature that barely varies is left unscaled."""
    return torch.where(std > MIN_STD, std, torch.ones_like(std))


def _linears(net: DCNv2) -> tuple[list[nn.Linear], list[nn.Linear], list[nn.Linear]]:
    """A DCN-v2's linear layers in order: its cross layers, its MLP's, its head."""
    cross = [cast(nn.Linear, layer) for layer in net.cross]
    return cross, [x for x in net.deep if isinstance(x, nn.Linear)], [net.head]


def _stacked(members: Sequence[Sequence[nn.Linear]]) -> nn.ParameterList:
    """The same layers of every member as (weight, bias) pairs, ``(members, out, in)`` and
    ``(members, out)``, layer after layer."""
    out = []
    for same in zip(*members, strict=True):  # one layer of every member
        out.append(nn.Parameter(torch.stack([lin.weight.detach() for lin in same])))
        out.append(nn.Parameter(torch.stack([lin.bias.detach() for lin in same])))
    return nn.ParameterList(out)


def _pairs(params: nn.ParameterList) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A stacked ParameterList's (weight, bias) per layer."""
    return [(params[i], params[i + 1]) for i in range(0, len(params), 2)]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Every member's ``nn.Linear`` at once: ``x`` ``(members, rows, in)``, ``weight``
    ``(members, out, in)``, ``bias`` ``(members, out)``."""
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


#: What a release serves as its feature ranker: one DCN-v2 or a seed ensemble of them.
Ranker = DCNv2 | RankerEnsemble


def build_ranker(members: int, make: Callable[[], DCNv2] = DCNv2) -> Ranker:
    """One DCN-v2 from ``make`` (``members`` 1: saved as before ensembles existed), else an
    ensemble of ``members``, each made in turn from the global random state."""
    if members < 1:
        raise ValueError(f"a feature ranker needs at least one member, got {members}")
    nets = [make() for _ in range(members)]
    return nets[0] if members == 1 else RankerEnsemble(nets)


class FeatureScorer(nn.Module):
    """The ranker as served: ``(batch, 1)`` logit and probability, like the cross-encoder."""

    def __init__(self, model: Ranker) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit = self.model(features).unsqueeze(-1)
        return logit, torch.sigmoid(logit)


def save_feature_ranker(model: Ranker, out: Path) -> None:
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


def load_feature_ranker(path: Path) -> Ranker:
    """The saved model; refuses one trained on another feature list (a silent mismatch
    would score every candidate with the wrong inputs)."""
    config = json.loads((path / CONFIG_FILE).read_text())
    if list(config["features"]) != list(FEATURES):
        raise ValueError(
            f"{path} was trained on features {config['features']}, this code builds "
            f"{list(FEATURES)}: retrain or use the matching code"
        )
    model = build_ranker(int(config.get("members", 1)), lambda: DCNv2.from_config(config))
    model.load_state_dict(torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return model.eval()
