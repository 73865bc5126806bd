"""Ray Train per-worker loops for the two-tower retriever and the cross-encoder ranker.

Each loop runs inside a :class:`ray.train.torch.TorchTrainer` worker:

* the model is wrapped with ``ray.train.torch.prepare_model`` (DDP) and the data with
  ``ray.train.torch.prepare_data_loader`` (adds a ``DistributedSampler``);
* after every epoch all workers call ``ray.train.report(metrics, checkpoint=...)``; rank 0
  evaluates (Recall@K for retrieval, AUC + log-loss for the ranker), writes a checkpoint
  directory (model files, ``train_state.pt`` with optimizer/scheduler/epoch/history, and
  ``metrics.json``) and attaches it;
* on start, ``ray.train.get_checkpoint()`` (set by Ray after a worker failure with
  ``FailureConfig(max_failures)``, or when a run with the same name/storage is restarted) or
  ``config["resume_from"]`` restores weights, optimizer, scheduler and epoch, so training
  continues with the next epoch.

Checkpoint layout - retrieval: ``user_tower/``, ``item_tower/`` (see
:mod:`training.models.two_tower`); ranker: ``ranker/`` (see :mod:`training.models.ranker`);
both: ``train_state.pt`` and ``metrics.json``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from training.models.metrics import log_loss, recall_at_k, roc_auc
from training.models.pretrained import load_tokenizer, set_offline
from training.models.ranker import CrossEncoder, adamw, encode_pairs, load_ranker, save_ranker
from training.models.two_tower import TwoTower, in_batch_softmax_loss, load_towers, save_towers

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.json"


# --------------------------------------------------------------------------------------------
# shared helpers


def _ray_get(x: Any) -> Any:
    import ray

    return ray.get(x) if isinstance(x, ray.ObjectRef) else x


def _context() -> tuple[int, int]:
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _setup(cfg: dict[str, Any], rank: int) -> None:
    set_offline()
    threads = int(cfg.get("torch_threads") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    seed = int(cfg.get("seed", 0))
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)  # same init on every rank; DDP also broadcasts rank 0's weights


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


def _unwrap(model: torch.nn.Module) -> Any:
    return model.module if hasattr(model, "module") else model


def _linear_schedule(
    optimizer: torch.optim.Optimizer, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def _mean_across_workers(value: float, world: int) -> float:
    if world <= 1 or not torch.distributed.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t.item()) / world


def _restore_dir(cfg: dict[str, Any]) -> tuple[Any, str | None]:
    """The checkpoint to resume from: Ray's (failure restart / restored run) or the path
    given in ``cfg["resume_from"]``."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        return ckpt, None
    path = cfg.get("resume_from")
    return None, str(path) if path else None


def _resume(
    cfg: dict[str, Any], rank: int, stage: str, load: Callable[[Path], Any]
) -> tuple[Any, dict[str, Any] | None]:
    """The model (``load`` of the checkpoint directory) and training state to resume from,
    or ``(None, None)`` for a fresh start."""
    ckpt, resume_path = _restore_dir(cfg)
    if ckpt is None and not resume_path:
        return None, None
    with ckpt.as_directory() if ckpt is not None else _nullctx(resume_path) as d:
        model = load(Path(d))
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
    _log(rank, f"[{stage}] resumed from checkpoint after epoch {state['epoch'] + 1}")
    return model, state


def _optimizer(
    model: Any, cfg: dict[str, Any], steps: int, state: dict[str, Any] | None
) -> tuple[Any, Any, list[dict[str, Any]], int]:
    """AdamW with linear warm-up/decay over every step of the run; restored from ``state``
    when resuming. Returns (optimizer, schedule, metrics history, first epoch to run)."""
    total = steps * int(cfg["epochs"])
    opt = adamw(model, cfg["lr"], cfg["weight_decay"])
    sched = _linear_schedule(opt, int(cfg["warmup_ratio"] * total), total)
    if state is None:
        return opt, sched, [], 0
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return opt, sched, list(state["history"]), int(state["epoch"]) + 1


def _epoch_metrics(
    epoch: int, losses: list[float], world: int, t0: float, **extra: Any
) -> dict[str, Any]:
    """Training-loss summary of one epoch, averaged over workers (every worker calls this)."""
    return {
        "epoch": epoch,
        "train_loss": _mean_across_workers(float(np.mean(losses)) if losses else math.nan, world),
        "train_loss_first_step": _mean_across_workers(losses[0] if losses else math.nan, world),
        "train_loss_last_step": _mean_across_workers(losses[-1] if losses else math.nan, world),
        **extra,
        "epoch_seconds": time.time() - t0,
    }


def _report(
    rank: int,
    metrics: dict[str, Any],
    save: Callable[[Path], None] | None,
    history: list[dict[str, Any]] | None = None,
) -> None:
    """``ray.train.report`` on every worker; rank 0 attaches a checkpoint directory written
    by ``save`` plus ``metrics.json`` (``{"latest": metrics, "history": [...]}``)."""
    import ray.train

    if rank == 0 and save is not None:
        tmp = Path(tempfile.mkdtemp(prefix="ckpt-"))
        try:
            save(tmp)
            doc = {"latest": metrics, "history": history or [metrics]}
            (tmp / METRICS_FILE).write_text(json.dumps(doc, indent=2, default=float) + "\n")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        ray.train.report(metrics, checkpoint=None)


def _maybe_fail(cfg: dict[str, Any], epoch: int, rank: int) -> None:
    """Test hook: raise once after ``fail_after_epoch`` (a marker file makes it once)."""
    fail_at = cfg.get("fail_after_epoch")
    marker = cfg.get("fail_marker")
    if fail_at is None or epoch != int(fail_at) or not marker:
        return
    if rank == 0 and not os.path.exists(marker):
        Path(marker).write_text(f"failed after epoch {epoch}\n")
        raise RuntimeError(f"injected failure after epoch {epoch} (fail_after_epoch)")


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: Sequence[Any]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Any:
        return self.rows[i]


def _loader(rows: Sequence[Any], batch_size: int, world: int, collate: Any) -> DataLoader:
    import ray.train.torch

    drop_last = len(rows) >= 2 * batch_size * world
    loader = DataLoader(
        _ListDataset(rows),
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate,
        drop_last=drop_last,
    )
    return ray.train.torch.prepare_data_loader(loader)


def _set_epoch(loader: DataLoader, epoch: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)  # type: ignore[union-attr]


def _step_log(
    rank: int, stage: str, epoch: int, epochs: int, step: int, steps: int, **kv: Any
) -> None:
    parts = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kv.items())
    _log(rank, f"[{stage}] epoch {epoch + 1}/{epochs} step {step}/{steps} {parts}")


# --------------------------------------------------------------------------------------------
# retrieval


class RetrievalCollator:
    def __init__(self, tokenizer: Any, max_seq_len: int) -> None:
        self.tok = tokenizer
        self.max_len = max_seq_len

    def __call__(self, rows: list[dict[str, str]]) -> dict[str, torch.Tensor]:
        u = self.tok(
            [r["user_text"] for r in rows],
            truncation=True,
            max_length=self.max_len,
            padding=True,
            return_tensors="pt",
        )
        i = self.tok(
            [r["item_text"] for r in rows],
            truncation=True,
            max_length=self.max_len,
            padding=True,
            return_tensors="pt",
        )
        users = {x: k for k, x in enumerate(dict.fromkeys(r["user_id"] for r in rows))}
        items = {x: k for k, x in enumerate(dict.fromkeys(r["item_id"] for r in rows))}
        return {
            "user_input_ids": u["input_ids"],
            "user_attention_mask": u["attention_mask"],
            "item_input_ids": i["input_ids"],
            "item_attention_mask": i["attention_mask"],
            "user_idx": torch.tensor([users[r["user_id"]] for r in rows]),
            "item_idx": torch.tensor([items[r["item_id"]] for r in rows]),
        }


@torch.no_grad()
def encode_texts(
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_seq_len: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Normalised vectors for ``texts`` (batched, length-sorted to limit padding)."""
    order = sorted(range(len(texts)), key=lambda k: len(texts[k]))
    out: list[torch.Tensor | None] = [None] * len(texts)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        enc = tokenizer(
            [texts[k] for k in idx],
            truncation=True,
            max_length=max_seq_len,
            padding=True,
            return_tensors="pt",
        )
        vecs = encode(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float().cpu()
        for j, k in enumerate(idx):
            out[k] = vecs[j]
    if not texts:
        return torch.empty(0, 0)
    return torch.stack([v for v in out if v is not None])


@torch.no_grad()
def top_k_items(
    model: TwoTower,
    tokenizer: Any,
    user_texts: Sequence[str],
    item_ids: Sequence[str],
    item_texts: Sequence[str],
    *,
    k: int,
    exclude: Sequence[set[str]] | None = None,
    max_seq_len: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> list[list[str]]:
    """The ``k`` best items per user by inner product, skipping ``exclude[u]``."""
    model.eval()
    item_vecs = encode_texts(
        model.encode_items,
        tokenizer,
        item_texts,
        max_seq_len=max_seq_len,
        batch_size=batch_size,
        device=device,
    )
    user_vecs = encode_texts(
        model.encode_users,
        tokenizer,
        user_texts,
        max_seq_len=max_seq_len,
        batch_size=batch_size,
        device=device,
    )
    scores = user_vecs @ item_vecs.T
    pos = {iid: j for j, iid in enumerate(item_ids)}
    if exclude is not None:
        for u, ex in enumerate(exclude):
            cols = [pos[i] for i in ex if i in pos]
            if cols:
                scores[u, cols] = float("-inf")
    kk = min(k, len(item_ids))
    top = scores.topk(kk, dim=1).indices.tolist()
    return [[item_ids[j] for j in row] for row in top]


def evaluate_retrieval(
    model: TwoTower,
    tokenizer: Any,
    eval_data: dict[str, Any],
    *,
    k: int,
    max_seq_len: int,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    users = eval_data["users"]
    if not users:
        return {}
    ranked = top_k_items(
        model,
        tokenizer,
        [u["user_text"] for u in users],
        eval_data["item_ids"],
        eval_data["item_texts"],
        k=k,
        exclude=[set(u["seen"]) for u in users],
        max_seq_len=max_seq_len,
        batch_size=batch_size,
        device=device,
    )
    recall = recall_at_k(ranked, [u["relevant"] for u in users], k)
    hit = float(
        np.mean([bool(set(r) & set(u["relevant"])) for r, u in zip(ranked, users, strict=True)])
    )
    return {
        f"recall_at_{k}": recall,
        f"hit_rate_at_{k}": hit,
        "eval_users": float(len(users)),
        "eval_candidates": float(len(eval_data["item_ids"])),
    }


def retrieval_loop(cfg: dict[str, Any]) -> None:
    """Ray Train worker loop for the two-tower model (config: see ``training.train``)."""
    import ray.train.torch

    rank, world = _context()
    _setup(cfg, rank)
    device = ray.train.torch.get_device()
    tok = load_tokenizer(cfg["pretrained"])
    learn_temperature = cfg["learn_temperature"]
    model, state = _resume(
        cfg, rank, "retrieval", lambda d: load_towers(d, learn_temperature=learn_temperature)[0]
    )
    if model is None:
        model = TwoTower.from_pretrained(
            cfg["pretrained"],
            shared_weights=cfg["shared_weights"],
            temperature=cfg["temperature"],
            learn_temperature=cfg["learn_temperature"],
        )
    ddp = ray.train.torch.prepare_model(model)
    examples = _ray_get(cfg["train_examples"])
    loader = _loader(examples, cfg["batch_size"], world, RetrievalCollator(tok, cfg["max_seq_len"]))
    steps = len(loader)
    epochs = int(cfg["epochs"])
    opt, sched, history, start = _optimizer(_unwrap(ddp), cfg, steps, state)
    eval_data = _ray_get(cfg["eval_data"]) if rank == 0 else None

    def evaluate() -> dict[str, float]:  # rank 0 only, where eval_data is loaded
        assert eval_data is not None
        return evaluate_retrieval(
            _unwrap(ddp),
            tok,
            eval_data,
            k=int(cfg.get("k", 10)),
            max_seq_len=cfg["max_seq_len"],
            batch_size=cfg["eval_batch_size"],
            device=device,
        )

    if rank == 0 and start == 0 and cfg.get("eval_before_training") and eval_data:
        base = evaluate()
        _log(rank, f"[retrieval] before training: {base}")
        history.append({"epoch": -1, **base})
    _log(rank, f"[retrieval] {len(examples)} examples, {world} workers, {steps} steps/epoch/worker")
    for epoch in range(start, epochs):
        _set_epoch(loader, epoch)
        ddp.train()
        losses: list[float] = []
        t0 = time.time()
        for step, batch in enumerate(loader, 1):
            u, v, scale = ddp(
                batch["user_input_ids"],
                batch["user_attention_mask"],
                batch["item_input_ids"],
                batch["item_attention_mask"],
            )
            loss = in_batch_softmax_loss(u, v, scale, batch["user_idx"], batch["item_idx"])
            _optimizer_step(ddp, opt, sched, loss)
            losses.append(float(loss.item()))
            if step % cfg["log_every"] == 0 or step == steps:
                _step_log(
                    rank,
                    "retrieval",
                    epoch,
                    epochs,
                    step,
                    steps,
                    loss=losses[-1],
                    lr=sched.get_last_lr()[0],
                    temperature=_unwrap(ddp).temperature,
                    s_per_step=(time.time() - t0) / step,
                )
        metrics = _epoch_metrics(epoch, losses, world, t0, temperature=_unwrap(ddp).temperature)
        save = None
        if rank == 0:
            if eval_data:
                metrics.update(evaluate())
            history.append(dict(metrics))
            _log(rank, f"[retrieval] epoch {epoch + 1}/{epochs} " + _fmt(metrics))

            snapshot = list(history)

            def save(d: Path, _epoch: int = epoch, _hist: list[Any] = snapshot) -> None:
                save_towers(_unwrap(ddp), tok, d, max_seq_len=cfg["max_seq_len"])
                _save_state(d, _epoch, opt, sched, _hist)

        _report(rank, metrics, save, history)
        _maybe_fail(cfg, epoch, rank)


# --------------------------------------------------------------------------------------------
# ranker


class PairCollator:
    def __init__(self, tokenizer: Any, max_seq_len: int) -> None:
        self.tok = tokenizer
        self.max_len = max_seq_len

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        enc = encode_pairs(
            self.tok, [r["user_text"] for r in rows], [r["item_text"] for r in rows], self.max_len
        )
        enc["labels"] = torch.tensor([float(r["label"]) for r in rows], dtype=torch.float32)
        return enc


@torch.no_grad()
def predict_pairs(
    model: CrossEncoder,
    tokenizer: Any,
    pairs: Sequence[dict[str, Any]],
    *,
    max_seq_len: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Click probabilities for ``{"user_text", "item_text"}`` pairs."""
    model.eval()
    out = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        enc = encode_pairs(
            tokenizer, [p["user_text"] for p in chunk], [p["item_text"] for p in chunk], max_seq_len
        )
        enc = {k: v.to(device) for k, v in enc.items()}
        out.append(torch.sigmoid(model(**enc)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def evaluate_ranker(
    model: CrossEncoder,
    tokenizer: Any,
    pairs: Sequence[dict[str, Any]],
    *,
    max_seq_len: int,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    if not pairs:
        return {}
    probs = predict_pairs(
        model, tokenizer, pairs, max_seq_len=max_seq_len, batch_size=batch_size, device=device
    )
    labels = np.array([float(p["label"]) for p in pairs])
    out = {
        "auc": roc_auc(labels, probs),
        "log_loss": log_loss(labels, probs),
        "eval_pairs": float(len(pairs)),
        "eval_positive_rate": float(labels.mean()),
    }
    hard = np.array([p.get("kind") != "random" for p in pairs])
    if hard.any() and (labels[hard] == 0).any():
        out["auc_vs_hard"] = roc_auc(labels[hard], probs[hard])
    return out


def ranker_loop(cfg: dict[str, Any]) -> None:
    """Ray Train worker loop for the cross-encoder ranker."""
    import ray.train.torch

    rank, world = _context()
    _setup(cfg, rank)
    device = ray.train.torch.get_device()
    tok = load_tokenizer(cfg["pretrained"])
    model, state = _resume(cfg, rank, "ranker", lambda d: load_ranker(d / "ranker")[0])
    if model is None:
        model = CrossEncoder.from_pretrained(cfg["pretrained"])
    ddp = ray.train.torch.prepare_model(model)
    examples = _ray_get(cfg["train_examples"])
    loader = _loader(examples, cfg["batch_size"], world, PairCollator(tok, cfg["max_seq_len"]))
    steps = len(loader)
    epochs = int(cfg["epochs"])
    opt, sched, history, start = _optimizer(_unwrap(ddp), cfg, steps, state)
    eval_pairs = _ray_get(cfg["eval_data"]) if rank == 0 else None

    def evaluate() -> dict[str, float]:  # rank 0 only, where eval_pairs are loaded
        assert eval_pairs is not None
        return evaluate_ranker(
            _unwrap(ddp),
            tok,
            eval_pairs,
            max_seq_len=cfg["max_seq_len"],
            batch_size=cfg["eval_batch_size"],
            device=device,
        )

    pos_rate = float(np.mean([e["label"] for e in examples])) if examples else 0.5
    pos_weight = None
    if cfg.get("balance_classes") and 0 < pos_rate < 1:
        pos_weight = torch.tensor([(1 - pos_rate) / pos_rate], device=device)
    if rank == 0 and start == 0 and cfg.get("eval_before_training") and eval_pairs:
        base = evaluate()
        _log(rank, f"[ranker] before training: {base}")
        history.append({"epoch": -1, **base})
    _log(
        rank,
        f"[ranker] {len(examples)} pairs (positive rate {pos_rate:.3f}), {world} workers, "
        f"{steps} steps/epoch/worker",
    )
    for epoch in range(start, epochs):
        _set_epoch(loader, epoch)
        ddp.train()
        losses: list[float] = []
        t0 = time.time()
        for step, batch in enumerate(loader, 1):
            labels = batch.pop("labels")
            logits = ddp(**batch)
            loss = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=pos_weight)
            _optimizer_step(ddp, opt, sched, loss)
            losses.append(float(loss.item()))
            if step % cfg["log_every"] == 0 or step == steps:
                _step_log(
                    rank,
                    "ranker",
                    epoch,
                    epochs,
                    step,
                    steps,
                    loss=losses[-1],
                    lr=sched.get_last_lr()[0],
                    s_per_step=(time.time() - t0) / step,
                )
        metrics = _epoch_metrics(epoch, losses, world, t0)
        save = None
        if rank == 0:
            if eval_pairs:
                metrics.update(evaluate())
            history.append(dict(metrics))
            _log(rank, f"[ranker] epoch {epoch + 1}/{epochs} " + _fmt(metrics))

            snapshot = list(history)

            def save(d: Path, _epoch: int = epoch, _hist: list[Any] = snapshot) -> None:
                save_ranker(_unwrap(ddp), tok, d / "ranker", max_seq_len=cfg["max_seq_len"])
                _save_state(d, _epoch, opt, sched, _hist)

        _report(rank, metrics, save, history)
        _maybe_fail(cfg, epoch, rank)


# --------------------------------------------------------------------------------------------


def _optimizer_step(model: Any, opt: Any, sched: Any, loss: torch.Tensor) -> None:
    """Backward, clip the global gradient norm to 1, step the optimizer and the schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()


def _save_state(d: Path, epoch: int, opt: Any, sched: Any, history: list[Any]) -> None:
    """What resuming needs besides the weights: epoch, optimizer, scheduler, metrics."""
    torch.save(
        {
            "epoch": epoch,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "history": history,
        },
        d / STATE_FILE,
    )


class _nullctx:
    def __init__(self, path: str | None) -> None:
        self.path = path

    def __enter__(self) -> str:
        assert self.path is not None
        return self.path

    def __exit__(self, *exc: object) -> None:
        return None


def _fmt(metrics: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )


def mine_with_towers(
    towers_dir: str,
    user_texts: list[str],
    exclude: list[set[str]],
    item_ids: list[str],
    item_texts: list[str],
    top_k: int,
    max_seq_len: int,
    threads: int = 0,
) -> list[list[str]]:
    """Top-``top_k`` items per user text under saved towers (hard-negative mining)."""
    set_offline()
    if threads > 0:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_towers(towers_dir)
    model.to(device)
    tok = load_tokenizer(Path(towers_dir) / "user_tower")
    return top_k_items(
        model,
        tok,
        user_texts,
        item_ids,
        item_texts,
        k=top_k,
        exclude=exclude,
        max_seq_len=max_seq_len,
        device=device,
    )
