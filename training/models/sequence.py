"""A SASRec-style sequence model of user behaviour (Kang & McAuley, 2018), trained with
full-softmax cross-entropy (Klenitskiy & Vasilev, RecSys 2023), pure PyTorch.

The model reads a user's last ``max_seq_len`` interactions in time order and predicts the
next positive one; its last hidden state is the user vector in the item space (ANN-ready).

* **Inputs per position**: item representation + event-token embedding (event type x
  positive/negative, so a low rating or a view reads differently from a purchase; works for
  click-only data too) + bucketised log2 time-gap embedding (gap to the previous
  interaction: first, same second, 1 s, 2 s, 4 s, ... ~30 years) + bucketised log2 count of
  the user's earlier interactions (a new user's third event vs the start of a training chunk
  cut from a long history) + position.
* **Item representation** (shared by inputs and outputs, i.e. tied): a learned id embedding,
  or a shared learned "new item" vector for items without training events, plus a linear
  projection of the item's frozen BERT content vector. An item nobody has interacted with
  is therefore scored through its content alone. ``id_dropout`` swaps random items' id
  embeddings for the new-item vector during training so that path is trained.
* **Request-time item term** (``time_term``): an additive per-item score,
  ``w . log1p(decayed positive counts at half-lives 1/7/30/365 days and all time) +
  b[item age bucket]``, read from snapshots of the training period taken at event-count
  quantiles (``time_periods``). A training target uses the snapshot of the period its own
  timestamp falls in (only events before that period start: no leakage); recommendations use
  the final snapshot ("now"). Age buckets: "no interaction yet" (before the snapshot), then
  log2 days since the first interaction. (A first version had a separate bucket for items
  whose first interaction falls inside the target's period: that leaks the future - such an
  item is in the bucket *because* it is about to be consumed - and at request time it put
  every never-seen item on top; validation NDCG fell with every epoch.) Items nobody has
  interacted with yet therefore get the prior learned for them, and their content vector
  decides among them. A dot product alone cannot express *when* an item is
  popular; the issue measured a plain SASRec at 0.29-0.31 NDCG@10 on the long-horizon
  protocol against 0.371 for time-decayed popularity, so the trend is put into the model
  (the ranker still learns the final fusion). Memory: ``(time_periods + 1) x items x 5``
  float16 values; lower ``time_periods`` for very large catalogues.
* **Loss**: cross-entropy over the whole catalogue at every position whose next interaction
  is positive; ``loss="sampled"`` draws ``negatives`` items from the training popularity
  and subtracts ``log q`` from every logit (logQ correction) for catalogues too large for a
  full softmax.
* **Regularisation**: on ml-latest-small every lightly regularised run lost validation NDCG
  with every epoch (users of a later period do not follow the older periods' sequences);
  the defaults (d=32, dropout 0.5, weight decay 0.1, 6 epochs) come from validation windows
  of the training period (``training/evaluation/FINDINGS.md``).
* **Same-second events**: ties of a user's timestamps have no real order (28% of
  ml-latest-small's training events share a second with another event of the same user),
  so :class:`SequenceCollator` reshuffles them every time it builds a batch.

The item space and the users' sequences the model reads are built in
:mod:`training.models.sequence_data`.

For ANN (Milvus, inner product): the user vector is ``[encode_user(...), 1]`` and the item
vectors ``[item_vectors(), request_bias()]``, which reproduces :meth:`SASRec.score_users`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from core.sequence_inputs import (
    GAP_BUCKETS,
    N_TOKENS,
    PAD,
    RANK_BUCKETS,
)
from training.config import SequenceConfig
from training.models.optim import ListDataset, optimizer_step, schedule
from training.models.sequence_data import (
    AGE_BUCKETS,
    N_POP_FEATURES,
    ItemSpace,
    SequenceCollator,
    UserSequence,
    build_item_space,
    training_rows,
    user_inputs,
    user_sequences,
)
from training.reproducible import deterministic

TERM_SCALE = 10.0  # see SASRec.__init__

MODEL_FILE = "model.pt"
CONFIG_FILE = "sequence_config.json"
ITEMS_FILE = "items.json"
CONTENT_FILE = "content.npy"
SPACE_FILE = "item_space.npz"


# --------------------------------------------------------------------------------------------
# the model


class _Block(nn.Module):
    """Pre-norm transformer block with causal self-attention."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=allowed,  # no attention dropout: on CPU it costs more than the rest
        )
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.ff(self.norm2(x)))


class SASRec(nn.Module):
    """Causal transformer over interactions; ``forward(batch)`` is the training loss (so the
    DDP wrapper sees every parameter used in its forward pass)."""

    # buffers (not saved in the state dict: they come from the ItemSpace)
    known: torch.Tensor
    content: torch.Tensor
    pop: torch.Tensor
    age: torch.Tensor
    proposal: torch.Tensor

    def __init__(self, cfg: SequenceConfig, space: ItemSpace) -> None:
        super().__init__()
        self.cfg, self.space = cfg, space
        n, d = space.n_items, cfg.dim
        self.item_emb = nn.Embedding(n + 1, d, padding_idx=PAD)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        self.new_item = nn.Parameter(torch.zeros(d))
        self.register_buffer("known", torch.from_numpy(np.r_[False, space.known]), False)
        content = space.content if cfg.use_content else np.zeros((n, 0), np.float32)
        c = content.shape[1] if content.size else 0
        self.content_proj = nn.Linear(c, d, bias=False) if c else None
        padded = np.zeros((n + 1, c), dtype=np.float32)
        padded[1:] = content.reshape(n, c)
        self.register_buffer("content", torch.from_numpy(padded), False)
        self.token_emb = nn.Embedding(N_TOKENS, d, padding_idx=PAD)
        self.gap_emb = nn.Embedding(GAP_BUCKETS, d, padding_idx=PAD)
        self.rank_emb = nn.Embedding(RANK_BUCKETS, d, padding_idx=PAD)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, d)
        self.in_norm, self.out_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(d, cfg.heads, cfg.dropout) for _ in range(cfg.blocks))
        # request-time term; padded with a zero item column so indices match the table
        pop = np.zeros((space.now + 1, n + 1, N_POP_FEATURES), dtype=np.float16)
        pop[:, 1:] = space.popularity
        age = np.zeros((space.now + 1, n + 1), dtype=np.int64)
        age[:, 1:] = space.age
        self.register_buffer("pop", torch.from_numpy(pop), False)
        self.register_buffer("age", torch.from_numpy(age), False)
        # stored divided by TERM_SCALE: Adam moves a parameter by about lr per step, too
        # little for these few scalars to reach their scale (biases of several units) in a
        # few hundred steps. Starts as a unigram prior (log all-time count, weight 1).
        w = torch.zeros(N_POP_FEATURES)
        w[-1] = 1.0
        age_bias = torch.zeros(AGE_BUCKETS)
        self.pop_weight = nn.Parameter(w / TERM_SCALE)
        self.age_bias = nn.Parameter(age_bias / TERM_SCALE)
        counts = np.expm1(space.popularity[-1, :, -1].astype(np.float64)) + 1.0
        q = np.r_[0.0, counts / counts.sum()]  # sampled softmax proposal (never the padding)
        self.register_buffer("proposal", torch.tensor(q, dtype=torch.float32), False)

    # --- representations -------------------------------------------------------------------
    def item_table(self) -> torch.Tensor:
        """``[N + 1, d]`` item representations (row 0: padding), inputs and outputs alike."""
        use_id = self.known
        if self.training and self.cfg.id_dropout > 0:
            keep = torch.rand(use_id.shape, device=use_id.device) >= self.cfg.id_dropout
            use_id = use_id & keep
        table = torch.where(use_id[:, None], self.item_emb.weight, self.new_item)
        if self.content_proj is not None:
            table = table + self.content_proj(self.content)
        return table

    def hidden(
        self, x: Mapping[str, torch.Tensor], table: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, L, d]`` hidden states of left-padded :data:`INPUTS`; position ``t`` attends
        to positions ``<= t`` only (and padding to nothing but itself)."""
        table = self.item_table() if table is None else table
        items = x["items"]
        n = items.shape[1]
        if n > self.cfg.max_seq_len:
            raise ValueError(f"{n} positions > max_seq_len {self.cfg.max_seq_len}")
        pos = torch.arange(self.cfg.max_seq_len - n, self.cfg.max_seq_len, device=items.device)
        h = (
            table[items]
            + self.token_emb(x["tokens"])
            + self.gap_emb(x["gaps"])
            + self.rank_emb(x["ranks"])
            + self.pos_emb(pos)
        )
        h = self.drop(self.in_norm(h))
        steps = torch.arange(n, device=items.device)  # comparisons, not tril/eye: ONNX-able
        causal = steps[:, None] >= steps[None, :]
        eye = steps[:, None] == steps[None, :]
        allowed = (causal & (items != PAD)[:, None, :]) | eye  # [B, L, L]
        allowed = allowed[:, None]  # heads
        for block in self.blocks:
            h = block(h, allowed)
        return self.out_norm(h)

    def time_term(self, periods: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """``[len(periods), len(items)]`` request-time item term of each snapshot index
        (``items``: model indices, default every item including the padding column)."""
        cols = slice(None) if items is None else items
        n = self.space.n_items + 1 if items is None else len(items)
        if not self.cfg.time_term:
            return torch.zeros(len(periods), n, device=periods.device)
        uniq, inv = periods.unique(return_inverse=True)
        pop, age = self.pop[uniq][:, cols], self.age[uniq][:, cols]
        rows = (pop.float() @ self.pop_weight + self.age_bias[age]) * TERM_SCALE
        return rows[inv]

    def pair_term(self, periods: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``[len(periods)]`` request-time term of one item per snapshot index."""
        if not self.cfg.time_term:
            return torch.zeros(len(periods), device=periods.device)
        pop = self.pop[periods, items].float() @ self.pop_weight
        return (pop + self.age_bias[self.age[periods, items]]) * TERM_SCALE

    # --- training ----------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of the positive next interactions of a collated batch."""
        table = self.item_table()
        h = self.hidden(batch, table)
        sel = batch["targets"] != PAD
        if not bool(sel.any()):  # keep every parameter in the graph (DDP)
            return (h.sum() + table.sum() + self.pop_weight.sum() + self.age_bias.sum()) * 0.0
        hs, y, per = h[sel], batch["targets"][sel], batch["target_periods"][sel]
        if self.cfg.loss == "sampled":
            losses = self._sampled_loss(hs, y, per, table)
        elif self.cfg.loss == "full":
            logits = hs @ table.T + self.time_term(per)
            logits[:, PAD] = float("-inf")
            losses = F.cross_entropy(logits, y, reduction="none")
        else:
            raise ValueError(f"unknown sequence loss {self.cfg.loss!r} (full or sampled)")
        if not self.cfg.user_balance:
            return losses.mean()
        # each target weighs n_user_positives ** -user_balance (1: every user counts alike)
        n = batch["user_positives"][:, None].expand_as(sel)[sel].float()
        w = n.pow(-self.cfg.user_balance)
        return (losses * w).sum() / w.sum()

    def _sampled_loss(
        self, hs: torch.Tensor, y: torch.Tensor, per: torch.Tensor, table: torch.Tensor
    ) -> torch.Tensor:
        """Sampled softmax: shared popularity-drawn negatives, logQ-corrected, accidental
        hits (a negative equal to the target) masked."""
        neg = torch.multinomial(self.proposal, self.cfg.negatives, replacement=True)
        logq = torch.log(self.proposal.clamp_min(1e-12))
        pos = (hs * table[y]).sum(-1) + self.pair_term(per, y) - logq[y]
        negs = hs @ table[neg].T + self.time_term(per, neg) - logq[neg]
        negs = negs.masked_fill(neg[None, :] == y[:, None], float("-inf"))
        logits = torch.cat([pos[:, None], negs], dim=1)
        zeros = torch.zeros(len(y), dtype=torch.long, device=y.device)
        return F.cross_entropy(logits, zeros, reduction="none")

    # --- serving -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_user(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[B, d]`` user vectors in the item space: the hidden state after the latest
        interaction of left-padded inputs (:func:`user_inputs`)."""
        return self.hidden(x)[:, -1]

    @torch.no_grad()
    def item_vectors(self) -> torch.Tensor:
        """``[N, d]`` item vectors (catalogue order of ``space.item_ids``)."""
        return self.item_table()[1:]

    @torch.no_grad()
    def served_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N + 1, d]`` item table and ``[N + 1]`` request-time term at "now" as served:
        row 0 (padding, and any item the model does not know) is the new-item vector
        without content, with no request-time term."""
        bias = self.request_bias()
        return self.item_table(), torch.cat([bias.new_zeros(1), bias])

    @torch.no_grad()
    def request_bias(self) -> torch.Tensor:
        """``[N]`` request-time item term at the final snapshot ("now")."""
        now = torch.tensor([self.space.now], device=self.pop.device)
        return self.time_term(now)[0, 1:]

    @torch.no_grad()
    def score_users(self, user_vectors: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` scores: dot product with every item plus the request-time term."""
        return user_vectors @ self.item_vectors().T + self.request_bias()[None, :]


# --------------------------------------------------------------------------------------------
# training without Ray (the offline evaluation), saving and loading


@deterministic()
def train_sequence_model(
    cfg: SequenceConfig,
    space: ItemSpace,
    rows: Sequence[Mapping[str, Any]],
    *,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    validation: Callable[[SASRec], float] | None = None,
) -> tuple[SASRec, list[dict[str, float]]]:
    """Train in this process (no Ray): the same model, batches, loss and optimizer settings
    as the Ray stage (:mod:`training.models.optim`: AdamW, linear warm-up/decay, the
    gradient norm clipped to 1); the same weights for the same seed from run to run, also
    on several threads (PyTorch's deterministic kernels).

    With ``validation`` (a score, higher is better) and ``cfg.early_stop_every``, it is
    early-stopped: scored every that many epochs, stopped after ``early_stop_patience``
    scores without a better one, and the best-scoring epoch's weights returned (its history
    rows carry ``val_score``). Scoring draws no random numbers, so the weights up to an
    epoch are those of a run without it."""
    torch.manual_seed(seed)
    model = SASRec(cfg, space)
    collate = SequenceCollator(cfg.max_seq_len, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    loader: torch.utils.data.DataLoader[Mapping[str, Any]] = torch.utils.data.DataLoader(
        ListDataset(rows),
        batch_size=cfg.batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=gen,
    )
    opt, sched = schedule(model, cfg, max(1, len(loader) * cfg.epochs))
    stop = _EarlyStop(cfg, validation) if validation and cfg.early_stop_every > 0 else None
    history: list[dict[str, float]] = []
    for epoch in range(cfg.run_epochs):
        model.train()
        t0, losses = time.perf_counter(), []
        for batch in loader:
            loss = model(batch)
            optimizer_step(model, opt, sched, loss)
            losses.append(float(loss.item()))
        row = {
            "epoch": float(epoch),
            "train_loss": float(np.mean(losses)) if losses else math.nan,
            "epoch_seconds": time.perf_counter() - t0,
        }
        if stop is not None and stop.due(epoch):
            row["val_score"] = stop.score(model)
        history.append(row)
        if log is not None:
            log(f"[sequence] epoch {epoch + 1}/{cfg.epochs} " + _fmt(row))
        if stop is not None and stop.exhausted:
            break
    if stop is not None:
        stop.restore(model)
    model.eval()
    return model, history


class _EarlyStop:
    """The best validation score so far and its weights (see train_sequence_model)."""

    def __init__(self, cfg: SequenceConfig, validation: Callable[[SASRec], float]) -> None:
        self.every, self.patience, self.last = (
            cfg.early_stop_every,
            max(1, cfg.early_stop_patience),
            cfg.run_epochs - 1,
        )
        self.validation = validation
        self.best, self.misses = -math.inf, 0
        self.state: dict[str, torch.Tensor] | None = None

    def due(self, epoch: int) -> bool:
        return (epoch + 1) % self.every == 0 or epoch == self.last

    def score(self, model: SASRec) -> float:
        value = float(self.validation(model))
        if value > self.best:
            self.best, self.misses = value, 0
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.misses += 1
        return value

    @property
    def exhausted(self) -> bool:
        return self.misses >= self.patience

    def restore(self, model: SASRec) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)


def train_on_events(
    cfg: SequenceConfig, events: pd.DataFrame, item_ids: Sequence[str], content: np.ndarray | None
) -> SASRec:
    """A model of ``item_ids`` (with their ``content`` vectors, row-aligned) trained in this
    process on ``events`` only: the feature ranker's replay twins, which must not have seen
    what their cut-offs' users did next."""
    space = build_item_space(events, item_ids, periods=cfg.time_periods, content=content)
    rows = training_rows(events, space, max_len=cfg.max_seq_len, max_rows=cfg.max_examples)
    model, _ = train_sequence_model(cfg, space, rows)
    return model


def twin_scorer(
    cfg: SequenceConfig,
    events: pd.DataFrame,
    item_ids: Sequence[str],
    content: np.ndarray | None,
    note: str,
    scored: Sequence[str] | None = None,
) -> Callable[[pd.DataFrame, Sequence[str]], np.ndarray]:
    """A twin of the served model (:func:`train_on_events`) as a scorer of ``scored``
    (default ``item_ids``) for each user's events (:func:`catalogue_scores`): the feature
    ranker's replay in ``make train`` and in ``ranker_validation`` alike. Prints ``note``,
    formatted with the ``events`` count and the training ``seconds``."""
    t0 = time.time()
    model = train_on_events(cfg, events, item_ids, content)
    print(note.format(events=len(events), seconds=time.time() - t0), flush=True)
    return model_scores(model, item_ids if scored is None else scored)


def model_scores(
    model: SASRec, item_ids: Sequence[str]
) -> Callable[[pd.DataFrame, Sequence[str]], np.ndarray]:
    """``model``'s scores of ``item_ids`` (the ranker's catalogue) for each user's events
    (:func:`catalogue_scores`), as the feature ranker's replay calls them."""
    return lambda histories, users: catalogue_scores(model, histories, users, item_ids)


def save_sequence_model(model: SASRec, out: Path) -> None:
    """``model.pt`` (weights), ``sequence_config.json``, ``items.json`` (the id vocabulary,
    model index = position + 1), ``content.npy`` (the content vectors it used) and
    ``item_space.npz`` (known items, request-time snapshots)."""
    out.mkdir(parents=True, exist_ok=True)
    s = model.space
    torch.save(model.state_dict(), out / MODEL_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model.cfg), indent=2) + "\n")
    (out / ITEMS_FILE).write_text(json.dumps(s.item_ids) + "\n")
    np.save(out / CONTENT_FILE, s.content)
    np.savez_compressed(
        out / SPACE_FILE, known=s.known, boundaries=s.boundaries, popularity=s.popularity, age=s.age
    )


def load_sequence_model(d: Path) -> SASRec:
    """The model :func:`save_sequence_model` wrote (in eval mode)."""
    raw = json.loads((d / CONFIG_FILE).read_text())
    names = {f.name for f in dataclasses.fields(SequenceConfig)}
    cfg = SequenceConfig(**{k: v for k, v in raw.items() if k in names})
    arrays = np.load(d / SPACE_FILE)
    space = ItemSpace(
        item_ids=json.loads((d / ITEMS_FILE).read_text()),
        known=arrays["known"],
        boundaries=arrays["boundaries"],
        popularity=arrays["popularity"],
        age=arrays["age"],
        content=np.load(d / CONTENT_FILE),
    )
    model = SASRec(cfg, space)
    model.load_state_dict(torch.load(d / MODEL_FILE, map_location="cpu", weights_only=True))
    return model.eval()


# --------------------------------------------------------------------------------------------
# validation (next positives of held-out users)


@dataclass(frozen=True)
class SequenceEval:
    """Validation users: inputs from their training events, the model indices they had
    already seen, and their next positives after the split (the targets)."""

    inputs: list[UserSequence]
    seen: list[np.ndarray]
    targets: list[np.ndarray]


def sequence_eval(
    train_events: pd.DataFrame,
    later_events: pd.DataFrame,
    space: ItemSpace,
    *,
    max_users: int | None,
    relevant_per_user: int = 10,
    seed: int = 0,
) -> SequenceEval:
    """Users with training history and unseen positives after the split; targets are their
    next ``relevant_per_user`` unseen positive items (the near future the model serves)."""
    hist = user_sequences(train_events, space)
    later = user_sequences(later_events, space)
    users = sorted(u for u in later if u in hist)
    rng = np.random.default_rng(seed)
    if max_users is not None and len(users) > max_users:
        users = sorted(rng.choice(users, size=max_users, replace=False).tolist())
    inputs, seen, targets = [], [], []
    for u in users:
        h, nx = hist[u], later[u]
        known = set(h.items.tolist())
        nxt = [i for i in dict.fromkeys(nx.items[nx.positive].tolist()) if i not in known]
        if not nxt:
            continue
        inputs.append(h)
        seen.append(np.array(sorted(known), dtype=np.int64))
        targets.append(np.array(nxt[:relevant_per_user], dtype=np.int64))
    return SequenceEval(inputs, seen, targets)


def evaluate_sequence(
    model: SASRec,
    data: SequenceEval,
    *,
    k: int = 10,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """NDCG@k and Recall@k (truncated denominator) over the whole catalogue, seen items
    excluded."""
    if not data.inputs:
        return {}
    ndcg, recall = _per_user(model, data, k, batch_size, device)
    return {
        f"ndcg_at_{k}": float(np.mean(ndcg)),
        f"recall_at_{k}": float(np.mean(recall)),
        "eval_users": float(len(ndcg)),
    }


def sequence_ndcg(model: SASRec, data: SequenceEval, k: int = 10) -> np.ndarray:
    """Each validation user's NDCG@k (:func:`evaluate_sequence`'s, before the mean)."""
    return _per_user(model, data, k, 256, "cpu")[0]


@torch.no_grad()
def _per_user(
    model: SASRec, data: SequenceEval, k: int, batch_size: int, device: torch.device | str
) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    ndcg, recall = [], []
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    for s in range(0, len(data.inputs), batch_size):
        chunk = slice(s, s + batch_size)
        x = user_inputs(data.inputs[chunk], model.cfg.max_seq_len)
        scores = model.score_users(model.encode_user({n: t.to(device) for n, t in x.items()}))
        scores = scores.cpu()
        for r, (seen, rel) in enumerate(zip(data.seen[chunk], data.targets[chunk], strict=True)):
            row = scores[r]
            row[torch.from_numpy(seen - 1)] = float("-inf")
            top = (row.topk(min(k, len(row))).indices + 1).numpy()
            hits = np.isin(top, rel)
            ideal = min(k, len(rel))
            ndcg.append(float((hits * discounts[: len(hits)]).sum() / discounts[:ideal].sum()))
            recall.append(float(hits.sum() / ideal))
    return np.array(ndcg), np.array(recall)


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


@torch.no_grad()
def catalogue_scores(
    model: SASRec, histories: pd.DataFrame, users: Sequence[str], item_ids: Sequence[str]
) -> np.ndarray:
    """``[len(users), len(item_ids)]`` scores of each user's events in ``histories`` over the
    given items, as the served model computes them (``SequenceRecommender`` in the export):
    dot product with the item table plus the request-time term at "now"; an item the model
    does not know scores as a new item without content (the table's padding row)."""
    model.eval()
    seqs = user_sequences(histories, model.space)
    x = user_inputs([seqs.get(str(u)) for u in users], model.cfg.max_seq_len)
    table, bias = model.served_terms()
    scores = model.hidden(x, table)[:, -1] @ table.T + bias
    index = model.space.index()
    cols = torch.tensor([index.get(str(i), PAD) for i in item_ids], dtype=torch.long)
    return scores[:, cols].numpy()
