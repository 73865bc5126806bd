"""User segments: PCA of the user vectors, spherical k-means there, full-space centroids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from ops.segments import (
    MAX_DIMS,
    SegmentReport,
    cluster,
    fit_projection,
    fit_segment_model,
    scan_k,
    unit_rows,
)

DIM = 384


def clustered(
    k: int = 4,
    per_cluster: int = 60,
    *,
    shared: float = 3.0,
    noise: float = 0.05,
    dim: int = DIM,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors: a direction every user shares (weight ``shared``), one orthogonal
    direction per cluster and isotropic noise, like tower vectors sitting in a narrow cone."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, k + 1)))[0].T  # orthonormal rows
    truth = np.repeat(np.arange(k), per_cluster)
    x = shared * basis[0] + basis[1:][truth] + rng.normal(0, noise, (len(truth), dim))
    return unit_rows(x).astype(np.float32), truth


def test_pca_then_kmeans_recovers_the_clusters() -> None:
    x, truth = clustered()
    model = fit_segment_model(x, 4)
    assert adjusted_rand_score(truth, model.labels) == pytest.approx(1.0)
    assert np.bincount(model.labels).tolist() == [60, 60, 60, 60]
    assert model.projection is not None and model.projection.dims == MAX_DIMS
    assert model.silhouette_reduced is not None and model.silhouette_reduced > 0.7
    # the same labels on the full vectors: the noise of all 384 dimensions is in there
    assert model.silhouette_full is not None
    assert model.silhouette_full < model.silhouette_reduced - 0.15
    # centroids live in the user-vector space the gateway searches, unit norm, and the
    # gateway's rule (nearest centroid by inner product) gives every user its own label
    assert model.centroids.shape == (4, DIM)
    assert np.allclose(np.linalg.norm(model.centroids, axis=1), 1.0, atol=1e-5)
    assert model.agreement == 1.0


def test_a_dominant_shared_direction_needs_the_centred_reduction() -> None:
    """Cosine on the raw vectors cannot see clusters that are tiny next to the direction all
    users share (float32 resolution); PCA centres that away. Skipping it loses the clusters."""
    x, truth = clustered(shared=3000.0)
    reduced = fit_segment_model(x, 4)
    raw = fit_segment_model(x, 4, max_dims=0)
    assert raw.projection is None
    assert adjusted_rand_score(truth, reduced.labels) > 0.99
    assert adjusted_rand_score(truth, raw.labels) < 0.5
    assert reduced.silhouette_reduced is not None and reduced.silhouette_reduced > 0.7


def test_projection_is_the_centred_pca() -> None:
    """transform() = the top principal components of the centred vectors, then L2-normalised
    (compared through the Gram matrix: components are defined up to sign)."""
    x, _ = clustered(shared=3.0, noise=0.02, seed=3)
    x = x[np.r_[0:60, 60:90, 120:135, 180:185]]  # unequal sizes: the mean is off-centre
    projection = fit_projection(x, max_dims=16, min_variance=0.8)
    assert projection is not None
    dims = projection.dims
    assert 3 <= dims < 16  # fewer than fitted: which ones are kept matters
    centred = x.astype(np.float64) - x.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    expected = unit_rows(centred @ vt[:dims].T)
    got = projection.transform(x)
    assert np.allclose(got @ got.T, expected @ expected.T, atol=1e-3)
    kept = (singular[:dims] ** 2).sum() / (singular**2).sum()
    assert projection.explained_variance == pytest.approx(kept, rel=1e-3)
    assert projection.explained_variance >= 0.8
    # an uncentred projection is a different space
    uncentred = unit_rows(x @ vt[:dims].T)
    assert not np.allclose(got @ got.T, uncentred @ uncentred.T, atol=1e-2)


def test_fewer_dims_when_they_keep_the_variance() -> None:
    x, _ = clustered(noise=0.001)  # all variance in the 3-d span of the cluster directions
    projection = fit_projection(x)
    assert projection is not None
    assert projection.dims == 3 and projection.explained_variance > 0.9
    capped = fit_projection(x, max_dims=2)
    assert capped is not None and capped.dims == 2 and capped.explained_variance < 0.9


def test_no_reduction_when_off_or_too_few_users() -> None:
    x, _ = clustered()
    assert fit_projection(x, max_dims=0) is None
    assert fit_projection(x[:2]) is None
    tiny = fit_segment_model(x[:2], 4)
    assert tiny.projection is None and sorted(tiny.labels.tolist()) == [0, 1]
    assert tiny.silhouette_full is None  # undefined with one user per cluster
    single = fit_segment_model(x[:1], 8)
    assert single.labels.tolist() == [0] and single.centroids.shape == (1, DIM)


def test_segments_are_numbered_by_size_without_gaps() -> None:
    x, _ = clustered(k=3, per_cluster=10)
    x = np.vstack([x, x[:25]])  # 35, 10, 10 users; 6 duplicates of each point
    labels = cluster(unit_rows(x), k=8, seed=0)
    sizes = np.bincount(labels)
    assert sizes.min() > 0 and labels.max() == len(sizes) - 1
    assert list(sizes) == sorted(sizes, reverse=True)


def test_k_scan_reports_a_silhouette_per_k() -> None:
    x, _ = clustered()
    scores = scan_k(x, [2, 4, 8])
    assert set(scores) == {2, 4, 8}
    assert scores[4] is not None and scores[4] == max(v for v in scores.values() if v is not None)


def test_report_lines() -> None:
    report = SegmentReport(
        users=240,
        k=4,
        sizes={"seg-0": 60, "seg-1": 60, "seg-2": 60, "seg-3": 60},
        reduction="pca",
        input_dims=DIM,
        dims=32,
        explained_variance=0.62,
        silhouette_reduced=0.76,
        silhouette_full=0.5,
        agreement=1.0,
        online_agreement=0.99,
        online_checked=100,
        k_scan={4: 0.76, 8: 0.4},
    )
    text = "\n".join(report.markdown())
    assert "PCA to 32 of 384 dims (0.620 of the variance)" in text
    assert "seg-3: 60" in text and "0.760" in text and "0.990 of 100 checked" in text
    assert "k=8: 0.400" in text
    assert report.to_dict()["sizes"]["seg-0"] == 60
    assert SegmentReport(k=4).markdown() == ["- no users with a vector: no segments fitted."]


def test_make_eval_writes_the_segment_report(tmp_path: Path) -> None:
    from ops.served_eval import write_segments

    (tmp_path / "eval.md").write_text("# Offline evaluation\n")
    report = SegmentReport(users=3, k=2, sizes={"seg-0": 2, "seg-1": 1}, input_dims=DIM, dims=DIM)
    write_segments(report, tmp_path)
    text = (tmp_path / "eval.md").read_text()
    assert text.startswith("# Offline evaluation\n")  # appended, not replaced
    assert "## User segments" in text and "seg-0: 2, seg-1: 1" in text
    assert json.loads((tmp_path / "segments.json").read_text())["sizes"] == {"seg-0": 2, "seg-1": 1}
