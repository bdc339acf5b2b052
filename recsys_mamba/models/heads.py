"""Task heads on top of any `SequenceEncoder`: next-click ranking and CTR.

Both score through the encoder's tied item embeddings, so a head holds no item table of its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys_mamba.errors import RecsysError
from recsys_mamba.models.base import Dropout, SequenceEncoder
from recsys_mamba.models.transitions import TransitionTable
from recsys_mamba.ops.linear_ce import SeenItems


class NextItemHead(nn.Module):
    """Next-click: full softmax cross-entropy, or sampled softmax with logQ correction.

    Targets equal to 0 (padding) are ignored, so hidden states of every position of a padded batch
    can be flattened and passed as they are.

    With `seen_bias`, one learned scalar is added to the score of every item the input sequence
    already holds (up to the scored position), in training and at ranking alike. A data set where
    users do not come back to an item (each movie rated once) drives it negative, one with repeat
    purchases positive: a repeat-or-explore prior the encoder would otherwise have to learn by
    remembering every item of the sequence in its hidden state.

    With `transition_prior`, a learned weight times log(1 + how often each item followed the row's
    current item in the training sequences) is added too (`models.transitions`); the table is
    attached from the training data with `attach_transitions` and saved with the weights.
    """

    def __init__(
        self,
        loss: str = "ce",
        n_negatives: int = 1024,
        logq: bool = True,
        mask_history: bool = False,
        seen_bias: bool = False,
        transition_prior: bool = False,
    ) -> None:
        super().__init__()
        if loss not in ("ce", "sampled"):
            raise RecsysError(f"NextItemHead loss must be 'ce' or 'sampled', got {loss!r}")
        if loss == "sampled" and n_negatives < 1:
            raise RecsysError(f"sampled softmax needs n_negatives >= 1, got {n_negatives}")
        self.loss_type = loss
        self.n_negatives = n_negatives
        self.logq = logq
        self.mask_history = mask_history
        self.seen_bias = nn.Parameter(torch.zeros(())) if seen_bias else None
        self.transition_weight = nn.Parameter(torch.zeros(())) if transition_prior else None
        self.transitions: TransitionTable | None = None

    def attach_transitions(self, table: TransitionTable) -> None:
        """The training data's transition counts, for a head with transition_prior (before loading
        a checkpoint into it: the table's size must match the saved one)."""
        self.transitions = table

    def _table(self) -> TransitionTable:
        if self.transitions is None:
            raise RecsysError(
                "NextItemHead(transition_prior=True) has no transition table: attach_transitions(table) "
                "with the training data's counts (training.run.build does)"
            )
        return self.transitions

    def loss(
        self,
        encoder: SequenceEncoder,
        hidden: Tensor,
        targets: Tensor,
        item_log_probs: Tensor | None = None,
        seen: SeenItems | None = None,
        inputs: Tensor | None = None,
    ) -> Tensor:
        """Mean loss over the non-padding targets; hidden (N, d), targets (N,).

        item_log_probs (n_items + 1,): log of the distribution negatives are drawn from (e.g. item
        popularity), finite for every item that can be a target (smooth zero counts); None means
        uniform. Only used by the sampled loss. seen: what each row's sequence held so far (one row
        per target); required with seen_bias, ignored without. inputs (N,): the item each row has
        just seen, whose successors the transition prior lifts; required with transition_prior.
        """
        if self.seen_bias is not None and seen is None:
            raise RecsysError("NextItemHead(seen_bias=True).loss needs seen: the items each row has seen")
        if self.transition_weight is not None and inputs is None:
            raise RecsysError("NextItemHead(transition_prior=True).loss needs inputs: each row's item")
        seen = seen if self.seen_bias is not None else None
        keep = targets != 0
        hidden, targets = hidden[keep], targets[keep]
        if seen is not None:
            seen = seen.subset(keep)
        if targets.numel() == 0:
            unused = [p for p in (self.seen_bias, self.transition_weight) if p is not None]
            return hidden.sum() * 0.0 + sum(p * 0.0 for p in unused)
        prior = None
        if self.transition_weight is not None:
            # Leave-one-out: the pair being predicted is not counted, as a test pair is not.
            prior = self._table().successors(inputs[keep], exclude=targets)
        if self.loss_type == "ce":
            bias = None if seen is None else self.seen_bias
            weight = None if prior is None else self.transition_weight
            return encoder.cross_entropy_all(hidden, targets, bias, seen, weight, prior)
        return self._sampled_loss(encoder, hidden, targets, item_log_probs, seen, inputs, keep)

    def _sampled_loss(
        self,
        encoder: SequenceEncoder,
        hidden: Tensor,
        targets: Tensor,
        item_log_probs: Tensor | None,
        seen: SeenItems | None,
        inputs: Tensor | None = None,
        keep: Tensor | None = None,
    ) -> Tensor:
        # One set of negatives shared by the whole batch; logQ correction subtracts each item's log
        # sampling probability so popular items are not over-penalised (Yi et al., 2019).
        n = encoder.n_items + 1
        if item_log_probs is None:
            item_log_probs = torch.full((n,), -math.log(encoder.n_items), device=hidden.device)
        if item_log_probs.shape != (n,):
            raise RecsysError(
                f"item_log_probs must have shape ({n},) = (n_items + 1,), got {tuple(item_log_probs.shape)}"
            )
        log_q = item_log_probs.to(hidden.device, hidden.dtype).clone()
        log_q[0] = float("-inf")  # padding is never a negative
        negatives = torch.multinomial(log_q.softmax(0), self.n_negatives, replacement=True)
        pos_logits = encoder.score_candidates(hidden, targets[:, None])  # (N, 1)
        neg_logits = hidden @ encoder.item_vectors(negatives).t()  # (N, K)
        if seen is not None:
            pos_logits = pos_logits + self.seen_bias * seen.contains(targets[:, None])
            neg_logits = neg_logits + self.seen_bias * seen.contains(negatives)
        if self.transition_weight is not None:
            table, current = self._table(), inputs[keep]
            pos_prior = table.values(current, targets[:, None]).expm1().sub(1).clamp(min=0).log1p()
            neg_prior = table.values(current, negatives[None, :].expand(len(current), -1))
            pos_logits = pos_logits + self.transition_weight * pos_prior  # leave-one-out, as in `loss`
            neg_logits = neg_logits + self.transition_weight * neg_prior
        if self.logq:
            pos_logits = pos_logits - log_q[targets][:, None]
            neg_logits = neg_logits - log_q[negatives][None, :]
        neg_logits = neg_logits.masked_fill(
            negatives[None, :] == targets[:, None], float("-inf")
        )  # accidental hits
        logits = torch.cat([pos_logits, neg_logits], dim=1)
        return F.cross_entropy(logits, torch.zeros_like(targets))

    def rank_scores(
        self,
        encoder: SequenceEncoder,
        hidden: Tensor,
        history: Tensor | None = None,
        seen: SeenItems | None = None,
        last_items: Tensor | None = None,
    ) -> Tensor:
        """Scores of every item (B, n_items + 1) for ranking; history items get -inf when mask_history.

        seen (one row per hidden row): the items each input sequence holds, for seen_bias; required
        with it. last_items (B,): each sequence's last item, for transition_prior; required with it.
        """
        scores = encoder.score_all(hidden)
        if self.seen_bias is not None:
            if seen is None:
                raise RecsysError("NextItemHead(seen_bias=True) ranks with seen: the items of each sequence")
            scores = scores + self.seen_bias * seen.mask()
        if self.transition_weight is not None:
            if last_items is None:
                raise RecsysError("NextItemHead(transition_prior=True) ranks with last_items (each row's)")
            scores = scores + self.transition_weight * self._table().dense(last_items).to(scores.dtype)
        if self.mask_history and history is not None:
            scores = scores.scatter(1, history, float("-inf"))
        return scores


class CTRHead(nn.Module):
    """Click probability of a candidate item given the encoded history.

    Inputs to the MLP are [h, e, h*e] with h the hidden state at the last real event and e the
    candidate's embedding (item + category); with target_attention, a DIN-style pooled vector of
    the history weighted by relevance to the candidate is appended. Trained with BCE, whose
    minimiser is the true click probability, so sigmoid(logit) is used as the CTR estimate;
    `base_rate` starts the output bias at the training click rate.
    """

    def __init__(
        self,
        d_model: int,
        mlp_dims: Sequence[int] = (200, 80),
        dropout: float = 0.1,
        target_attention: bool = True,
        attention_dim: int = 64,
        base_rate: float | None = None,
    ) -> None:
        super().__init__()
        self.target_attention = target_attention
        if target_attention:
            # DIN's local activation unit: scores each history state against the candidate.
            self.attention = nn.Sequential(
                nn.Linear(4 * d_model, attention_dim), nn.ReLU(), nn.Linear(attention_dim, 1)
            )
        layers: list[nn.Module] = []
        width = (4 if target_attention else 3) * d_model
        for dim in mlp_dims:
            layers += [nn.Linear(width, dim), nn.ReLU(), Dropout(dropout)]
            width = dim
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        if base_rate is not None:
            if not 0.0 < base_rate < 1.0:
                raise RecsysError(f"base_rate must be in (0, 1), got {base_rate}")
            nn.init.constant_(self.mlp[-1].bias, float(torch.logit(torch.tensor(base_rate))))

    def forward(
        self,
        encoder: SequenceEncoder,
        hidden: Tensor,
        mask: Tensor,
        cand_items: Tensor,
        cand_categories: Tensor | None = None,
    ) -> Tensor:
        """hidden (B, L, d), mask (B, L) True at real events, candidates (B,) -> logits (B,).

        A row without any real event has h = 0 (and a zero pooled vector): the prediction then
        rests on the candidate alone.
        """
        if hidden.dim() != 3 or mask.shape != hidden.shape[:2] or cand_items.shape != hidden.shape[:1]:
            raise RecsysError(
                f"CTRHead expects hidden (B, L, d), mask (B, L), cand_items (B,); got {tuple(hidden.shape)}, "
                f"{tuple(mask.shape)}, {tuple(cand_items.shape)}"
            )
        mask = mask.bool()
        e = encoder.embed(cand_items, cand_categories)
        last = (mask.sum(1) - 1).clamp(min=0)
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last] * mask.any(1, keepdim=True)
        features = [h, e, h * e]
        if self.target_attention:
            cand = e[:, None, :].expand_as(hidden)
            scores = self.attention(torch.cat([hidden, cand, hidden - cand, hidden * cand], dim=-1)).squeeze(
                -1
            )
            # Padding gets weight exactly 0; a row with no real event ends with all-zero weights.
            weights = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), dim=1) * mask
            features.append((weights[..., None] * hidden).sum(1))
        return self.mlp(torch.cat(features, dim=-1)).squeeze(-1)

    @staticmethod
    def loss(logits: Tensor, labels: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
