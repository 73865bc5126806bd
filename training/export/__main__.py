"""``python -m training.export``: publish towers (and the rankers) as a new Triton release.

With ``--checkpoint`` it reads a training run's output (``item_tower/``, ``user_tower/`` and
optionally ``ranker/``, ``feature_ranker/`` and ``sequence/``, the last two where the run
chose to serve them: ``training.release_choice``); without it, both towers are the
pretrained BERT checkpoint. The item tower is also written as ``model.int8.onnx``
(``training.export.quantize``), which the CPU ``item_encoder`` serves only where its config
names it.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from core.config import get_settings
from training.export.onnx_export import (
    ParityError,
    QuantisationLoss,
    TowerExportReport,
    export_feature_ranker,
    export_ranker,
    export_sequence_model,
    export_tower,
    quantize_tower,
)
from training.export.repository import (
    INT8_GRAPH,
    TOWERS,
    copy_tokenizer,
    new_release,
    prune,
    release_metadata,
)
from training.models.feature_ranker import is_served, uses_sequence
from training.pretrained import resolve_pretrained

log = logging.getLogger("training.export")


def served_feature_ranker(checkpoint: Path) -> str | None:
    """The checkpoint's feature ranker when its release serves it (see ``is_served``): a
    release without one serves the retrieval order."""
    ranker = checkpoint / "feature_ranker"
    return str(ranker) if ranker.is_dir() and is_served(ranker) else None


def served_sequence(checkpoint: Path) -> str | None:
    """The checkpoint's sequence model when its release serves it: there is one, and the
    feature ranker (if any, served or not: it is trained on the replay of the run's choice)
    was trained with its features (see ``uses_sequence``)."""
    seq, ranker = checkpoint / "sequence", checkpoint / "feature_ranker"
    if not seq.is_dir() or (ranker.is_dir() and not uses_sequence(ranker)):
        return None
    return str(seq)


def export_release(
    repository: Path,
    item_tower: str,
    user_tower: str,
    ranker: str | None = None,
    keep: int = 3,
    feature_ranker: str | None = None,
    sequence: str | None = None,
) -> dict[str, object]:
    """Export every model of one release into ``repository``; returns the parity report."""
    release = new_release(repository)
    log.info("release %d into %s", release.version, repository)
    report: dict[str, object] = {"version": release.version}
    try:
        copy_tokenizer(item_tower, release.stage("tokenizer") / "tokenizer")
        sources = {"item": item_tower, "user": user_tower}
        exported: dict[str, TowerExportReport] = {}
        for tower in TOWERS:
            target = release.stage(f"{tower}_encoder") / "model.onnx"
            if sources[tower] in exported:  # shared weights: one export, two models
                shutil.copyfile(exported[sources[tower]].onnx_path, target)
                continue
            result = export_tower(sources[tower], target)
            exported[sources[tower]] = result
            report[f"{tower}_encoder"] = result.as_dict()
            release.stage(f"{tower}_embedder")
        for tower in TOWERS:
            if f"{tower}_embedder" not in release.staged:
                release.stage(f"{tower}_embedder")
        item_graph = release.staged["item_encoder"] / "model.onnx"
        reference = exported[item_tower].reference  # PyTorch's vectors: BERT loaded once
        try:
            int8 = quantize_tower(reference, item_graph, item_graph.with_name(INT8_GRAPH))
            report["item_encoder_int8"] = int8.as_dict()
        except QuantisationLoss as exc:  # optional: a config naming it falls back to fp32
            item_graph.with_name(INT8_GRAPH).unlink()
            log.warning("release %d ships without its int8 item graph: %s", release.version, exc)
            report["item_encoder_int8"] = f"not written: {exc}"
        if ranker:
            cross = export_ranker(ranker, release.stage("ranker") / "model.onnx")
            report["ranker"] = cross.as_dict()
            release.stage("ranker_scorer")
        if feature_ranker:
            target = release.stage("feature_ranker") / "model.onnx"
            report["feature_ranker"] = export_feature_ranker(feature_ranker, target).as_dict()
        if sequence:
            staged = release.stage("sequence_recommender")
            report["sequence_recommender"] = export_sequence_model(sequence, staged).as_dict()
        for model, entry in report.items():
            if isinstance(entry, dict):  # report where the file ends up, not the staging dir
                name, graph = model.removesuffix("_int8"), Path(str(entry["onnx"])).name
                entry["onnx"] = str(repository / name / str(release.version) / graph)
        release.commit(
            release_metadata(
                item_tower=item_tower,
                user_tower=user_tower,
                ranker=ranker,
                feature_ranker=feature_ranker,
                sequence=sequence,
            )
        )
    except BaseException:
        release.abort()
        raise
    report["pruned"] = [str(p) for p in prune(repository, keep)]
    return report


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__)
    parser.add_argument(
        "--checkpoint",
        help="training output dir (item_tower/, user_tower/, ranker/, feature_ranker/, sequence/)",
    )
    parser.add_argument(
        "--pretrained",
        default=settings.pretrained_model,
        help="HF BERT dir used when no checkpoint is given",
    )
    parser.add_argument("--repository", type=Path, default=settings.model_repository)
    parser.add_argument("--keep", type=int, default=3, help="versions kept per model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(message)s")
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
        item, user = str(ckpt / "item_tower"), str(ckpt / "user_tower")
        ranker = str(ckpt / "ranker") if (ckpt / "ranker").is_dir() else None
        feature_ranker = served_feature_ranker(ckpt)
        sequence = served_sequence(ckpt)
    else:
        item = user = resolve_pretrained(args.pretrained)
        ranker = feature_ranker = sequence = None
    try:
        report = export_release(
            args.repository, item, user, ranker, args.keep, feature_ranker, sequence
        )
    except (ParityError, FileNotFoundError, ValueError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
