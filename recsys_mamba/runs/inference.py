"""The model side of every inference path: encoded histories to top-k lists and pair scores, and
streaming state updates. The scoring job (`scoring/`), the Python API (`api.Recommender`) and the
service (`serving/`) all call these, so their results agree by construction."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor

from recsys_mamba.models.base import SequenceEncoder, State
from recsys_mamba.models.score_terms import EARLIER, History
from recsys_mamba.runs.load import Run
from recsys_mamba.sequences import pad_right
from recsys_mamba.sequences.store import SIDE_INPUTS

HIDDEN = "_hidden"  # a streaming state keeps its last output here, so ranking needs no re-encoding


def _padded(run: Run, users: pl.DataFrame) -> dict[str, Tensor]:
    """The most recent `max_len` events of each user, right-padded: items and the side inputs."""
    width = max(1, min(run.max_len, int(users["items"].list.len().max() or 1)))
    return {name: pad_right(users[name], width).to(run.device) for name in ("items", *SIDE_INPUTS)}


def encode(run: Run, users: pl.DataFrame) -> tuple[Tensor, Tensor]:
    """Hidden states (B, L, d) of users with at least one event, and the encoded items (B, L), on the
    model's device."""
    batch = _padded(run, users)
    with torch.no_grad():
        hidden = run.model.encoder.encode(batch)
    return hidden, batch["items"]


def encode_last(run: Run, users: pl.DataFrame) -> Tensor:
    """The hidden state (B, d) at each user's last encoded event (users with at least one event):
    what ranking reads, which an encoder may compute at that position alone (`encode_last`)."""
    with torch.no_grad():
        return run.model.encoder.encode_last(_padded(run, users))


def whole_history(run: Run, histories: pl.Series) -> History | None:
    """What each user of `histories` (lists of item indices) has had, when the head's scores depend on
    it: every distinct item (the whole history, not only the encoded window), the last one and the
    few before it (for a transition prior over several lags)."""
    if not run.model.head.uses_history:
        return None
    distinct = histories.list.unique()
    lengths = torch.from_numpy(distinct.list.len().to_numpy().astype(np.int64))
    items = pad_right(distinct, max(1, int(lengths.max()) if len(lengths) else 1))
    last = torch.from_numpy(histories.list.last().fill_null(0).to_numpy().astype(np.int64))
    earlier = pad_right(histories.list.reverse().list.slice(1, EARLIER), EARLIER)
    rows = torch.arange(len(lengths))
    device = run.device
    return History(
        items.to(device),
        rows.to(device),
        (lengths - 1).clamp(min=0).to(device),
        last.to(device),
        earlier=earlier.to(device),
    )


def next_item_scores(run: Run, hidden: Tensor, histories: pl.Series) -> Tensor:
    """Scores of every item (B, n_items + 1) from last hidden states (B, d) of the users of
    `histories`: the head's ranking scores, so a learned seen-item bias counts every item the user
    has had, and a transition prior starts from the last one, as in evaluation. On the CPU, wherever
    the model is."""
    with torch.no_grad():
        hidden = hidden.to(run.device)
        return run.model.head.rank_scores(run.model.encoder, hidden, whole_history(run, histories)).cpu()


def popularity_scores(run: Run) -> Tensor:
    """Log of smoothed training popularity: the score cold users and cold rows get."""
    counts = torch.as_tensor(run.data.items.counts, dtype=torch.float32) + 1.0
    scores = (counts / counts[1:].sum()).log()
    scores[0] = float("-inf")
    return scores


def rank_rows(run: Run, scores: Tensor, users: pl.DataFrame, top_k: int, exclude_seen: bool) -> pl.DataFrame:
    """Top-k (user_id, rank, item_id, score, cold) rows from a (B, n_items + 1) score matrix."""
    if exclude_seen:
        for i, seen in enumerate(users["items"].to_list()):
            if seen:
                scores[i, torch.as_tensor(seen)] = float("-inf")
    k = min(top_k, run.data.items.n_items)
    values, index = scores.topk(k, dim=1)
    keep = torch.isfinite(values).numpy().reshape(-1)
    cold = (users["items"].list.len() == 0).to_numpy()
    return pl.DataFrame(
        {
            "user_id": np.repeat(users["user_id"].to_numpy(), k)[keep],
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(users))[keep],
            "item_id": run.data.items.ids[index.numpy().reshape(-1)][keep],
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


def user_scores(run: Run, users: pl.DataFrame) -> Tensor:
    """Scores of every item (B, n_items + 1): the model's for users with history, popularity otherwise."""
    scores = popularity_scores(run).expand(len(users), -1).clone()
    warm = (users["items"].list.len() > 0).to_numpy()
    if warm.any():
        warm_users = users.filter(pl.Series(warm))
        last = encode_last(run, warm_users)
        scores[torch.from_numpy(warm)] = next_item_scores(run, last, warm_users["items"])
    return scores


def topk_chunk(run: Run, users: pl.DataFrame, top_k: int, exclude_seen: bool) -> pl.DataFrame:
    return rank_rows(run, user_scores(run, users), users, top_k, exclude_seen)


def pair_users(run: Run, user_ids: pl.Series, rows: np.ndarray) -> Tensor | None:
    """The user_idx of pairs `rows` (0 for users the training data did not have), for a head with user
    embeddings; None for the others. The user map is the training data's: such a run scores with its
    prepared folder (`prepared=`), which a bundle or a checkpoint alone does not carry."""
    if not getattr(run.model.head, "n_users", 0):
        return None
    return torch.from_numpy(run.prepared_data().user_index(user_ids.gather(rows)))


def candidate_chunk(run: Run, users: pl.DataFrame, pairs: pl.DataFrame) -> pl.DataFrame:
    """Scores of (user_id, item_id) pairs for `users` (a chunk of histories, pairs joined on user_id):
    what the task scores a pair with (next_item: the ranking score; ctr: the click probability).
    Cold users and unknown items are flagged; unknown items get a null score, cold users the item's
    popularity."""
    items_table = run.data.items
    pairs = pairs.join(users.with_row_index("row").select("user_id", "row"), on="user_id", how="left")
    idx = pairs["item_id"].replace_strict(items_table.index, default=0, return_dtype=pl.Int64).to_numpy()
    rows = pairs["row"].to_numpy().astype(np.int64)
    cold = (users["items"].list.len() == 0).to_numpy()[rows]
    score = popularity_scores(run).numpy()[idx].astype(np.float32)
    warm_rows = np.flatnonzero(~cold & (idx > 0))
    if warm_rows.size:
        hidden, history = encode(run, users)
        lengths = (history != 0).sum(1)
        device = run.device
        users_idx = pair_users(run, pairs["user_id"], warm_rows)
        with torch.no_grad():
            value = run.task.score_pairs(
                run.model,
                hidden,
                lengths,
                whole_history(run, users["items"]),
                torch.from_numpy(rows[warm_rows]).to(device),
                torch.from_numpy(idx[warm_rows]).to(device),
                torch.from_numpy(items_table.categories[idx[warm_rows]]).to(device),
                None if users_idx is None else users_idx.to(device),
            )
        score[warm_rows] = value.float().cpu().numpy()
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


# ---- streaming ------------------------------------------------------------------------------------


def fresh_state(encoder: SequenceEncoder) -> State:
    """A user's state before any event (with the last output, zero)."""
    state = encoder.init_state(1)
    state[HIDDEN] = torch.zeros(1, encoder.d_model)
    return state


@torch.no_grad()
def step_states(
    encoder: SequenceEncoder, states: list[State], items: Tensor, categories: Tensor, event_types: Tensor
) -> list[State]:
    """One event for each of `states` (each a different user's, in one batch): the new states, each
    with its last output. The encoder's own `step`, O(1) in the history for Mamba and GRU4Rec."""
    merged = encoder.merge_states([{k: v for k, v in st.items() if k != HIDDEN} for st in states])
    hidden, new = encoder.step(items, merged, categories, event_types)
    new[HIDDEN] = hidden
    return encoder.split_state(new)


def state_hidden(states: list[State]) -> Tensor:
    """The last outputs (B, d_model) of per-user states: what `next_item_scores` ranks from."""
    return torch.cat([st[HIDDEN] for st in states])


class StreamStates:
    """Per-user encoder states (with their last output) and the items each user has had, fed one event
    at a time: the stream mode of the scoring job and `Recommender.new_state` / `update`."""

    def __init__(self, encoder: SequenceEncoder) -> None:
        self.encoder = encoder
        self.states: dict[str, State] = {}
        self.seen: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.states)

    def update(self, users: list[str], items: Tensor, cats: Tensor, types: Tensor) -> None:
        """One event for each of `users` (all distinct)."""
        states = [self.states.get(u) or fresh_state(self.encoder) for u in users]
        new = step_states(self.encoder, states, items, cats, types)
        for user, state, item in zip(users, new, items.tolist(), strict=True):
            self.states[user] = state
            self.seen.setdefault(user, []).append(item)

    def consume(
        self, events: pl.DataFrame, chunk_events: int = 65536, wrap: Callable[[Any], Any] = lambda it: it
    ) -> None:
        """Apply `events` (model space, any order) in time order; a user's events stay in sequence.
        `wrap`: around the chunks (a progress bar)."""
        events = events.sort("timestamp", maintain_order=True)
        for start in wrap(range(0, len(events), chunk_events)):
            chunk = events.slice(start, chunk_events).with_columns(
                pl.int_range(pl.len()).over("user_id").alias("round")
            )
            # Within a chunk, a user's k-th event goes in round k, so one step batch holds a user once.
            for _, part in chunk.group_by("round", maintain_order=True):
                self.update(
                    part["user_id"].to_list(),
                    *(
                        torch.from_numpy(part[c].to_numpy().astype("int64"))
                        for c in ("item_idx", "category_idx", "event_type_idx")
                    ),
                )

    def table(self, users: list[str] | None = None) -> pl.DataFrame:
        """user_id and items (seen, model space) of `users` (default: all, sorted): the input of ranking."""
        users = sorted(self.states) if users is None else users
        return pl.DataFrame(
            {"user_id": users, "items": [self.seen.get(u, []) for u in users]},
            schema={"user_id": pl.String, "items": pl.List(pl.Int64)},
        )

    def hidden(self, users: list[str]) -> Tensor:
        """The last outputs (B, d_model) of `users`; zeros for a user without events."""
        return state_hidden([self.states.get(u) or fresh_state(self.encoder) for u in users])


def topk_from_states(
    run: Run, hidden: Tensor, users: pl.DataFrame, top_k: int, exclude_seen: bool
) -> pl.DataFrame:
    """Top-k rows of `users` (user_id, items: all they have had) from their states' last outputs
    (B, d): the state holds the whole stream, so a seen-item bias counts every item the user has had.
    Users without any event (empty items) get the popularity list, as in `topk_chunk`."""
    scores = popularity_scores(run).expand(len(users), -1).clone()
    warm = (users["items"].list.len() > 0).to_numpy()
    if warm.any():
        at = torch.from_numpy(warm)
        scores[at] = next_item_scores(run, hidden[at], users.filter(pl.Series(warm))["items"]).detach()
    return rank_rows(run, scores, users, top_k, exclude_seen)
