"""Tiny end-to-end Ray Train runs: 2 CPU workers, a 2-layer 32-wide random BERT.

One pipeline run (retrieval with an injected worker failure after epoch 2, so Ray restarts
the worker group from the latest checkpoint; then hard-negative mining, the ranker and the
sequence model and the feature ranker), then a ``--resume`` run that extends retrieval by one
epoch and reuses the finished rankers and sequence model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.integration

CONFIG = Path(__file__).resolve().parents[2] / "training" / "configs" / "local.yaml"


def _overrides(tiny_bert: str, root: Path) -> list[str]:
    return [
        f"pretrained_model={tiny_bert}",
        f"storage_path={root / 'runs'}",
        f"output_dir={root / 'final'}",
        "name=tiny",
        "history_len=5",
        "max_chars=200",
        "retrieval.max_examples=64",
        "retrieval.batch_size=8",
        "retrieval.epochs=3",
        "retrieval.lr=3e-3",
        "retrieval.warmup_ratio=0",
        "retrieval.max_seq_len=32",
        "retrieval.eval_users=10",
        "retrieval.eval_candidates=100",
        "retrieval.fail_after_epoch=1",
        "ranker.max_examples=32",
        "ranker.batch_size=8",
        "ranker.epochs=2",
        "ranker.lr=3e-3",
        "ranker.warmup_ratio=0",
        "ranker.max_seq_len=48",
        "ranker.eval_users=10",
        "ranker.mining_candidates=100",
        "ranker.hard_negative_top_k=10",
        "sequence.epochs=2",
        "sequence.max_examples=64",
        "sequence.batch_size=8",
        "sequence.dim=16",
        "sequence.blocks=1",
        "sequence.max_seq_len=20",
        "sequence.eval_users=20",
        "sequence.time_periods=8",
        "sequence.content_max_seq_len=32",
        "sequence.content_cache=false",
        # the choice between the configured setting and a content-only, early-stopped one
        "sequence.alternative={id_dropout: 1.0, epochs: 3, early_stop_every: 1}",
        "sequence.choice_min_users=2",  # a small log: few users after the cut-off
        "feature_ranker.epochs=2",
        "feature_ranker.batch_size=4",
        "feature_ranker.cutoffs=[0.7, 0.9]",
        "feature_ranker.users_per_cutoff=20",
        "feature_ranker.eval_users=20",
        "feature_ranker.candidates=20",
        "feature_ranker.sequence=true",  # the replayed sequence source and features
        "feature_ranker.choose_release=false",  # both served whatever the choice would say
    ]


@pytest.fixture(scope="module")
def first_run(
    ray_local: None, tiny_bert: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], Path, list[str]]:
    from training.config import load_config
    from training.train import run

    root = tmp_path_factory.mktemp("ray_run")
    ov = _overrides(tiny_bert, root)
    return run(load_config(CONFIG, ov)), root, ov


def _epochs(m: dict[str, Any], stage: str) -> list[dict[str, Any]]:
    return [e for e in m[stage]["epochs"] if e["epoch"] >= 0]


def test_two_worker_run_loss_goes_down_and_exports(
    first_run: tuple[dict[str, Any], Path, list[str]],
) -> None:
    metrics, root, _ = first_run
    ret = _epochs(metrics, "retrieval")
    # the injected failure after epoch index 1 was recovered from the checkpoint: every epoch
    # appears exactly once, in order
    assert [e["epoch"] for e in ret] == [0, 1, 2]
    assert (root / "runs" / ".tiny-retrieval.failed_once").exists()
    assert ret[-1]["train_loss"] < ret[0]["train_loss"]
    assert 0.0 <= ret[-1]["recall_at_10"] <= 1.0
    rk = _epochs(metrics, "ranker")
    assert [e["epoch"] for e in rk] == [0, 1]
    assert rk[-1]["train_loss"] < rk[0]["train_loss"]
    assert 0.0 <= rk[-1]["auc"] <= 1.0 and rk[-1]["log_loss"] > 0
    assert metrics["data"]["ranker_train_pairs"] == 32 * 3

    final = root / "final"
    for d in ("user_tower", "item_tower", "ranker"):
        assert (final / d / "config.json").exists(), d
    assert (final / "ranker" / "head.pt").exists()
    assert (final / "ranker" / "ranker_config.json").exists()
    assert (final / "train_config.yaml").exists()
    on_disk = json.loads((final / "metrics.json").read_text())
    assert on_disk["retrieval"]["final"]["epoch"] == 2
    # metrics are also written beside every checkpoint
    ckpt = Path(metrics["retrieval"]["checkpoint"])
    assert json.loads((ckpt / "metrics.json").read_text())["latest"]["epoch"] == 2


def test_sequence_stage_trains_and_exports(
    first_run: tuple[dict[str, Any], Path, list[str]],
) -> None:
    from training.models.sequence import load_sequence_model

    metrics, root, _ = first_run
    choice = metrics["data"]["sequence_choice"]  # chosen before the stage, on the training period
    assert set(choice["ndcg_at_10"]) == {"configured", "alternative"}
    assert [e for e, _ in choice["curves"]["alternative"]][:1] == [1]  # scored every epoch
    alternative = choice["chosen"] == "alternative"
    seq = _epochs(metrics, "sequence")
    assert [e["epoch"] for e in seq] == list(range(choice["stop_epoch"] if alternative else 2))
    assert all(e["train_loss"] > 0 for e in seq) and 0.0 <= seq[-1]["ndcg_at_10"] <= 1.0
    assert metrics["data"]["sequence_train_sequences"] == 64
    final = root / "final" / "sequence"
    for name in ("model.pt", "sequence_config.json", "items.json", "content.npy"):
        assert (final / name).exists(), name
    model = load_sequence_model(final)
    assert model.content.shape[1] == 32  # the tiny BERT's item vectors (+ a padding row)
    assert model.cfg.dim == 16 and len(model.space.item_ids) == metrics["data"]["items"]
    # the served model (and so the feature ranker's replay twins) carries the chosen setting
    assert model.cfg.id_dropout == (1.0 if alternative else 0.1) and model.cfg.alternative == {}
    assert model.cfg.stop_epoch == choice["stop_epoch"]


def test_sequence_content_is_the_trained_item_towers_catalogue(
    first_run: tuple[dict[str, Any], Path, list[str]],
) -> None:
    """One content encoder: the sequence model's item vectors are the trained item tower's,
    the vectors indexing writes into Milvus (``sequence.content_source: item_tower``)."""
    from core.text import item_texts
    from training.config import load_config, resolve_path
    from training.data import load_dataset
    from training.models.sequence import load_sequence_model
    from training.precision import use_bf16
    from training.tasks.retrieval import tower_vectors

    metrics, root, ov = first_run
    cfg = load_config(CONFIG, ov)
    assert cfg.sequence.content_source == "item_tower"
    assert metrics["timing_seconds"]["item_vectors"] > 0  # the catalogue encoding was timed
    model = load_sequence_model(root / "final" / "sequence")
    rows = list(range(0, model.space.n_items, max(1, model.space.n_items // 40)))
    ids = [model.space.item_ids[n] for n in rows]
    texts = item_texts(load_dataset(resolve_path(cfg.data_dir)).items)
    bf16 = cfg.retrieval.bf16_encoding
    tower = str(root / "final" / "item_tower")
    want = tower_vectors(tower, [texts[i] for i in ids], cfg.retrieval.max_seq_len, bf16=bf16)
    got = model.space.content[rows]
    # bf16 products (a CPU with bf16 instructions) round a vector a little with its batch
    np.testing.assert_allclose(got, want, atol=5e-3 if use_bf16(bf16, "cpu") else 1e-5)


def test_feature_ranker_stage_trains_on_replayed_candidates_and_exports(
    first_run: tuple[dict[str, Any], Path, list[str]], tmp_path: Path
) -> None:
    import onnxruntime as ort

    from core.ranking_features import FEATURES
    from training.export.__main__ import served_sequence
    from training.export.onnx_export import export_feature_ranker
    from training.models.feature_ranker import load_feature_ranker

    metrics, root, _ = first_run
    fr = _epochs(metrics, "feature_ranker")
    assert [e["epoch"] for e in fr] == [0, 1]
    assert fr[-1]["train_loss"] < fr[0]["train_loss"]
    assert 0.0 <= fr[-1]["auc"] <= 1.0 and 0.0 <= fr[-1]["ndcg_at_10"] <= 1.0
    # beside the orders it has to beat: popularity, and the retrieval order it re-ranks
    assert all(0.0 <= fr[-1][f"ndcg_at_10_{o}"] <= 1.0 for o in ("popularity", "retrieval"))
    model = load_feature_ranker(root / "final" / "feature_ranker")
    assert float(model.std.min()) > 0 and float(model.mean.abs().sum()) > 0  # scaling fitted
    report = export_feature_ranker(str(root / "final" / "feature_ranker"), tmp_path / "m.onnx")
    assert report.max_abs_diff <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    rows = np.tile(model.mean.numpy().astype(np.float32), (3, 1))  # an average candidate
    logit, prob = session.run(None, {"features": rows})
    assert logit.shape == prob.shape == (3, 1) and np.all((prob > 0) & (prob < 1))
    assert rows.shape[1] == len(FEATURES)
    # trained with the sequence model: the replay found its candidates, the release serves it
    assert float(model.std[FEATURES.index("sequence_logp")]) != 1.0  # not the constant fill
    assert served_sequence(root / "final") == str(root / "final" / "sequence")


def test_the_feature_ranker_trains_on_the_replay_the_release_choice_picks(
    first_run: tuple[dict[str, Any], Path, list[str]], tmp_path: Path
) -> None:
    """With ``choose_release`` the stage replays with and without the sequence model,
    records the choice, and trains on the replay of the chosen sequence setting: a ranker
    trained without it has its features at the constant fill and makes a release that serves
    no sequence model; one the release does not serve is saved as such and not exported."""
    from core.ranking_features import FEATURES
    from training.config import load_config
    from training.export.__main__ import served_feature_ranker, served_sequence
    from training.models.feature_ranker import is_served, load_feature_ranker, uses_sequence
    from training.prepare import prepare_data
    from training.train import CatalogueVectors, fit_feature_ranker

    metrics, root, ov = first_run
    cfg = load_config(CONFIG, [*ov, "name=tiny-choice", "feature_ranker.choose_release=true"])
    data = prepare_data(cfg)
    catalogue = CatalogueVectors(cfg, data.dataset.items, root / "final" / "item_tower", {})
    seq_dir = Path(metrics["sequence"]["checkpoint"])
    out = fit_feature_ranker(cfg, data, catalogue, cfg.pretrained_dir(), False, seq_dir)
    choice = data.info["release_choice"]
    assert 0 < choice["users"] <= 20  # the last cut-off's users (the first has none before)
    assert choice["cutoffs"] == (1,)
    assert len(choice["ndcg"]) == 4 and all(0.0 <= v <= 1.0 for v in choice["ndcg"].values())
    assert choice["serves"] in choice["ndcg"]
    model = load_feature_ranker(out / "feature_ranker")
    assert uses_sequence(out / "feature_ranker") is choice["sequence"]
    assert is_served(out / "feature_ranker") is choice["ranker"]
    varied = float(model.std[FEATURES.index("sequence_logp")]) != 1.0  # not the constant fill
    assert varied is choice["sequence"]
    # what the export of a run that ended here would publish
    release = tmp_path / "final"
    shutil.copytree(out / "feature_ranker", release / "feature_ranker")
    shutil.copytree(seq_dir / "sequence", release / "sequence")
    assert (served_feature_ranker(release) is not None) is choice["ranker"]
    assert (served_sequence(release) is not None) is choice["sequence"]


def test_resume_continues_from_checkpoint(
    first_run: tuple[dict[str, Any], Path, list[str]],
) -> None:
    from training.config import load_config
    from training.train import run

    before, root, ov = first_run
    ov = [o for o in ov if not o.startswith(("retrieval.epochs", "retrieval.fail"))]
    cfg = load_config(CONFIG, [*ov, "retrieval.epochs=4"])
    after = run(cfg, resume=True)
    ret_before, ret_after = _epochs(before, "retrieval"), _epochs(after, "retrieval")
    assert [e["epoch"] for e in ret_after] == [0, 1, 2, 3]
    # epochs 0-2 come from the restored history, not from retraining
    assert ret_after[:3] == ret_before
    # the finished ranker and sequence stages were reused as is
    assert after["ranker"]["checkpoint"] == before["ranker"]["checkpoint"]
    assert after["sequence"]["checkpoint"] == before["sequence"]["checkpoint"]
    assert after["feature_ranker"]["checkpoint"] == before["feature_ranker"]["checkpoint"]
    assert (
        json.loads((root / "final" / "metrics.json").read_text())["retrieval"]["final"]["epoch"]
        == 3
    )
