"""The feature ranker's seed ensemble: what it serves, how it trains, how it is saved and
exported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from core.ranking_features import FEATURES
from training.config import FeatureRankerConfig
from training.models.feature_ranker import (
    DCNv2,
    RankerEnsemble,
    build_ranker,
    load_feature_ranker,
    save_feature_ranker,
)
from training.tasks.feature_ranker import FeatureRankerTask


def _rows(n: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, len(FEATURES), generator=torch.Generator().manual_seed(seed))


def test_an_ensemble_serves_its_members_mean_logit_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_ranker(3, lambda: DCNv2(sequence=True))
    assert isinstance(model, RankerEnsemble)
    model.set_scaling(torch.full((len(FEATURES),), 0.5), torch.full((len(FEATURES),), 2.0))
    model.eval()
    rows = _rows()
    each = model(rows, members=True)
    assert each.shape == (3, len(rows))
    assert not torch.allclose(each[0], each[1])  # each member from its own initialisation
    torch.testing.assert_close(model(rows), each.mean(dim=0))
    for i in range(3):  # the stacked layers compute what each member's own DCN-v2 does
        torch.testing.assert_close(each[i], model.member(i)(rows))
    assert float(model.mean[0]) == 0.5 and float(model.std[0]) == 2.0  # on every member

    save_feature_ranker(model, tmp_path / "ranker")
    config = json.loads((tmp_path / "ranker" / "config.json").read_text())
    assert config["members"] == 3 and config["sequence"] is True
    loaded = load_feature_ranker(tmp_path / "ranker")
    assert isinstance(loaded, RankerEnsemble)
    torch.testing.assert_close(loaded(rows), model(rows), rtol=0, atol=0)


def test_one_member_is_the_dcn_v2_saved_as_before_ensembles(tmp_path: Path) -> None:
    model = build_ranker(1)
    assert type(model) is DCNv2
    save_feature_ranker(model, tmp_path / "ranker")
    assert "members" not in json.loads((tmp_path / "ranker" / "config.json").read_text())
    assert type(load_feature_ranker(tmp_path / "ranker")) is DCNv2
    with pytest.raises(ValueError, match="at least one member"):
        build_ranker(0)
    with pytest.raises(ValueError, match="members must be at least 1"):
        FeatureRankerConfig(members=0)


def test_each_member_learns_from_its_own_loss_alone() -> None:
    """The training loss is the members' losses summed, so a member's gradient is what its
    own loss gives it: the members do not pull each other towards one model."""
    torch.manual_seed(0)
    task = FeatureRankerTask(FeatureRankerConfig(members=3))
    model = task.build_model("")
    assert isinstance(model, RankerEnsemble)
    model.eval()  # no dropout: the two gradients below see the same network
    rows = _rows()
    labels = (torch.rand(len(rows), generator=torch.Generator().manual_seed(1)) < 0.2).float()
    task.loss(model, {"features": rows, "labels": labels}).backward()
    member = model.member(1)
    F.binary_cross_entropy_with_logits(member(rows), labels).backward()
    together = [p.grad for p in model.parameters()]  # stacked: row 1 is member 1's
    alone = [p.grad for p in member.parameters()]
    assert len(together) == len(alone) > 0
    for a, b in zip(together, alone, strict=True):
        assert a is not None and b is not None
        torch.testing.assert_close(a[1], b)
    # one member: the loss is the plain binary cross-entropy it was before ensembles
    single = FeatureRankerTask(FeatureRankerConfig(members=1)).build_model("").eval()
    torch.testing.assert_close(
        task.loss(single, {"features": rows, "labels": labels}),
        F.binary_cross_entropy_with_logits(single(rows), labels),
    )


def test_an_ensemble_exports_as_one_graph_within_parity(tmp_path: Path) -> None:
    import onnxruntime as ort

    from training.export.onnx_export import export_feature_ranker

    torch.manual_seed(0)
    model = build_ranker(3)
    model.set_scaling(torch.full((len(FEATURES),), 0.3), torch.full((len(FEATURES),), 0.2))
    save_feature_ranker(model.eval(), tmp_path / "ranker")
    report = export_feature_ranker(str(tmp_path / "ranker"), tmp_path / "model.onnx")
    assert report.max_abs_diff <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    rows = _rows(5, seed=2)
    logit, probability = session.run(None, {"features": rows.numpy()})
    with torch.no_grad():
        want = model(rows).numpy()[:, None]
    np.testing.assert_allclose(logit, want, atol=1e-5)
    np.testing.assert_allclose(probability, 1 / (1 + np.exp(-want)), atol=1e-5)


def test_the_members_keep_their_own_losses_inside_ddp(tmp_path: Path) -> None:
    """Ray Train wraps the model in DDP: the loss must still reach the members one by one
    (through the wrapper's forward), not the mean logit the wrapper's plain call returns."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    task = FeatureRankerTask(FeatureRankerConfig(members=3))
    model = task.build_model("").eval()
    rows = _rows()
    labels = (torch.rand(len(rows), generator=torch.Generator().manual_seed(1)) < 0.2).float()
    batch = {"features": rows, "labels": labels}
    want = task.loss(model, batch)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        got = task.loss(wrapped, batch)
        got.backward()
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(got, want)
    mean_only = F.binary_cross_entropy_with_logits(model(rows), labels)  # what a bug would give
    assert abs(float(got) - 3 * float(mean_only)) > 1e-3
    assert all(p.grad is not None for p in model.parameters())
