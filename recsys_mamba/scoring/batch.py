"""Scoring chunks of users: encode the most recent `max_len` events once, then rank or score pairs."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from torch import Tensor

from recsys_mamba.ops.linear_ce import SeenItems
from recsys_mamba.scoring.model import ScoringModel

SIDE = ("categories", "event_types")


def padded(lists: pl.Series, width: int) -> Tensor:
    """Right-padded (B, width) LongTensor of the last `width` entries of each list."""
    rows = [np.asarray(v[-width:], dtype=np.int64) for v in lists.to_list()]
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


def encode(model: ScoringModel, users: pl.DataFrame) -> tuple[Tensor, Tensor]:
    """Hidden states (B, L, d) of users with at least one event, and the encoded items (B, L)."""
    width = max(1, min(model.max_len, int(users["items"].list.len().max() or 1)))
    batch = {name: padded(users[name], width) for name in ("items", *SIDE)}
    with torch.no_grad():
        hidden = model.encoder.encode(batch)
    return hidden, batch["items"]


def seen_items(model: ScoringModel, histories: pl.Series) -> SeenItems | None:
    """Every item each user of `histories` (lists of item indices) has had, each once, when the head
    learned a seen-item bias: the whole history, not only the encoded window; else None."""
    if getattr(model.head, "seen_bias", None) is None:
        return None
    distinct = histories.list.unique()
    lengths = torch.from_numpy(distinct.list.len().to_numpy().astype(np.int64))
    items = padded(distinct, max(1, int(lengths.max()) if len(lengths) else 1))
    return SeenItems.last(items, model.n_items + 1, lengths)


def last_items(model: ScoringModel, histories: pl.Series) -> Tensor | None:
    """Each user's last item (B,), when the head has a transition prior (which starts from it)."""
    if getattr(model.head, "transition_weight", None) is None:
        return None
    return torch.from_numpy(histories.list.last().fill_null(0).to_numpy().astype(np.int64))


def next_item_scores(model: ScoringModel, hidden: Tensor, histories: pl.Series) -> Tensor:
    """Scores of every item (B, n_items + 1) from last hidden states (B, d) of the users of
    `histories`: the head's ranking scores, so a learned seen-item bias counts every item the user
    has had, and a transition prior starts from the last one, as in evaluation."""
    seen, last = seen_items(model, histories), last_items(model, histories)
    with torch.no_grad():
        if seen is None and last is None:
            return model.encoder.score_all(hidden)
        return model.head.rank_scores(model.encoder, hidden, None, seen, last)


def last_state(hidden: Tensor, mask: Tensor) -> Tensor:
    last = (mask.sum(1) - 1).clamp(min=0)
    return hidden[torch.arange(hidden.shape[0]), last]


def popularity_scores(model: ScoringModel) -> Tensor:
    """Log of smoothed training popularity: the score cold users and cold rows get."""
    counts = torch.as_tensor(model.item_count, dtype=torch.float32) + 1.0
    scores = (counts / counts[1:].sum()).log()
    scores[0] = float("-inf")
    return scores


def rank_rows(
    model: ScoringModel, scores: Tensor, users: pl.DataFrame, top_k: int, exclude_seen: bool
) -> pl.DataFrame:
    """Top-k (user_id, rank, item_id, score, cold) rows from a (B, n_items + 1) score matrix."""
    if exclude_seen:
        for i, seen in enumerate(users["items"].to_list()):
            if seen:
                scores[i, torch.as_tensor(seen)] = float("-inf")
    k = min(top_k, model.n_items)
    values, index = scores.topk(k, dim=1)
    keep = torch.isfinite(values).numpy().reshape(-1)
    cold = (users["items"].list.len() == 0).to_numpy()
    return pl.DataFrame(
        {
            "user_id": np.repeat(users["user_id"].to_numpy(), k)[keep],
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(users))[keep],
            "item_id": model.item_ids[index.numpy().reshape(-1)][keep],
            "score": values.numpy().reshape(-1)[keep].astype(np.float32),
            "cold": np.repeat(cold, k)[keep],
        },
        schema={
            "user_id": pl.String,
            "rank": pl.Int32,
            "item_id": pl.String,
            "score": pl.Float32,
            "cold": pl.Boolean,
        },
    )


def user_scores(model: ScoringModel, users: pl.DataFrame) -> Tensor:
    """Scores of every item (B, n_items + 1): the model's for users with history, popularity otherwise."""
    scores = popularity_scores(model).expand(len(users), -1).clone()
    warm = (users["items"].list.len() > 0).to_numpy()
    if warm.any():
        warm_users = users.filter(pl.Series(warm))
        hidden, items = encode(model, warm_users)
        state = last_state(hidden, items != 0)
        scores[torch.from_numpy(warm)] = next_item_scores(model, state, warm_users["items"])
    return scores


def topk_chunk(model: ScoringModel, users: pl.DataFrame, top_k: int, exclude_seen: bool) -> pl.DataFrame:
    return rank_rows(model, user_scores(model, users), users, top_k, exclude_seen)


def candidate_chunk(model: ScoringModel, users: pl.DataFrame, pairs: pl.DataFrame) -> pl.DataFrame:
    """Scores of (user_id, item_id) pairs for `users` (a chunk of histories, pairs joined on user_id).

    next_item models give the dot-product logit, CTR models the click probability. Cold users and
    unknown items are flagged; unknown items get a null score, cold users the item's popularity.
    """
    pairs = pairs.join(users.with_row_index("row").select("user_id", "row"), on="user_id", how="left")
    idx = pairs["item_id"].replace_strict(model.id_to_idx, default=0, return_dtype=pl.Int64).to_numpy()
    rows = pairs["row"].to_numpy().astype(np.int64)
    cold = (users["items"].list.len() == 0).to_numpy()[rows]
    score = popularity_scores(model).numpy()[idx].astype(np.float32)
    warm_rows = np.flatnonzero(~cold & (idx > 0))
    if warm_rows.size:
        hidden, history = encode(model, users)
        mask = history != 0
        user_row = torch.from_numpy(rows[warm_rows])
        items = torch.from_numpy(idx[warm_rows])
        with torch.no_grad():
            if model.task == "ctr":
                cats = torch.from_numpy(model.item_category[idx[warm_rows]])
                logits = model.head(model.encoder, hidden[user_row], mask[user_row], items, cats)
                value = torch.sigmoid(logits)
            else:
                h = last_state(hidden, mask)[user_row]
                value = model.encoder.score_candidates(h, items[:, None])[:, 0]
                seen = seen_items(model, users["items"])
                if seen is not None:
                    was_seen = seen.subset(user_row).contains(items[:, None])[:, 0]
                    value = value + model.head.seen_bias * was_seen
                last = last_items(model, users["items"])
                if last is not None:
                    prior = model.head.transitions.values(last[user_row], items[:, None])[:, 0]
                    value = value + model.head.transition_weight * prior
        score[warm_rows] = value.float().numpy()
    return pl.DataFrame(
        {
            "user_id": pairs["user_id"],
            "item_id": pairs["item_id"],
            "score": pl.Series(score).scatter(np.flatnonzero(idx == 0), None) if (idx == 0).any() else score,
            "known_item": idx > 0,
            "cold": cold,
        },
        schema={
            "user_id": pl.String,
            "item_id": pl.String,
            "score": pl.Float32,
            "known_item": pl.Boolean,
            "cold": pl.Boolean,
        },
    )
