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
from recsys_mamba.models.score_terms import EARLIER, History, SeenColumns, TransitionColumns
from recsys_mamba.models.shared_attributes import check_max_items, shared_attribute_table
from recsys_mamba.models.transitions import TransitionTable
from recsys_mamba.ops.linear_ce import SparseScore, add_sparse_scores, sparse_scores_at


class Head(nn.Module):
    """What every head tells the code around it (defaults: a head that needs nothing of the data)."""

    mask_history = False  # rank with the items of the user's history removed (the masked protocol)

    @property
    def uses_history(self) -> bool:
        """Whether scores depend on what the user has seen (`score_terms` needs a `History`)."""
        return False

    @property
    def needs_transitions(self) -> bool:
        """Whether the head needs the training data's transition counts (`attach_transitions`)."""
        return False

    @property
    def needs_attributes(self) -> bool:
        """Whether the head needs the encoder's item attributes (`attach_attributes`)."""
        return False

    def rank_scores(self, encoder: SequenceEncoder, hidden: Tensor, history: History | None = None) -> Tensor:
        """Scores of every item (B, n_items + 1) after each row's history; column 0 is -inf."""
        return encoder.score_all(hidden)


class NextItemHead(Head):
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
    attached from the training data with `attach_transitions` and saved with the weights. With
    `transition_lags` k > 1, the successors of each of the k - 1 items before the current one add
    their own log(1 + count), each lag with its own learned weight: on short histories the pair
    (an item two or three events back -> the next one) is the same kind of exact evidence an
    embedding cannot hold pair by pair, and the encoder's state blurs it.

    With `attribute_prior`, a learned weight times log(1 + how many attributes each item shares with
    the row's current item) is added (`models.shared_attributes`; attributes held by more than
    `attribute_max_items` items are not counted). The table is built from the encoder's item
    attributes with `attach_attributes`; nothing in it is counted from events, so it needs no
    leave-one-out.

    With `contrastive_weight` > 0, training adds that weight times a contrastive loss between two
    encodings of the same batch that differ only in their dropout (`contrastive_loss`; the task
    encodes twice): the unsupervised and supervised positives of DuoRec (Qiu et al., 2022), a
    regulariser for sparse, short histories.

    With `label_smoothing` eps > 0 (full softmax only), the training target keeps 1 - eps on the
    next item and spreads eps evenly over every item: a cap on how far any one item's score is pushed
    above the rest, another regulariser for sparse data (Szegedy et al., 2016).

    With `future_steps` k > 0, training adds `future_weight` times the same loss for the items 2..k+1
    events ahead of each position, from the same hidden state and without the sparse terms (they
    describe the next event only): targets further ahead that ask each state to carry the user's
    lasting interests, not only the next click (PinnerFormer's dense all-action loss, Pancha et al.,
    2022, cut to a few steps).
    """

    def __init__(
        self,
        loss: str = "ce",
        n_negatives: int = 1024,
        logq: bool = True,
        mask_history: bool = False,
        seen_bias: bool = False,
        transition_prior: bool = False,
        transition_lags: int = 1,
        attribute_prior: bool = False,
        attribute_max_items: int = 300,
        contrastive_weight: float = 0.0,
        contrastive_temperature: float = 1.0,
        label_smoothing: float = 0.0,
        future_steps: int = 0,
        future_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(future_steps, bool) or not isinstance(future_steps, int) or future_steps < 0:
            raise RecsysError(f"NextItemHead needs an integer future_steps >= 0, got {future_steps!r}")
        if future_weight < 0:
            raise RecsysError(f"NextItemHead needs future_weight >= 0, got {future_weight}")
        if isinstance(transition_lags, bool) or not isinstance(transition_lags, int):
            raise RecsysError(f"NextItemHead needs an integer transition_lags, got {transition_lags!r}")
        if not 1 <= transition_lags <= 1 + EARLIER:
            raise RecsysError(
                f"NextItemHead needs 1 <= transition_lags <= {1 + EARLIER}, got {transition_lags}"
            )
        if contrastive_weight < 0 or contrastive_temperature <= 0:
            raise RecsysError(
                f"NextItemHead needs contrastive_weight >= 0 and contrastive_temperature > 0, got "
                f"{contrastive_weight} and {contrastive_temperature}"
            )
        if loss not in ("ce", "sampled"):
            raise RecsysError(f"NextItemHead loss must be 'ce' or 'sampled', got {loss!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise RecsysError(f"NextItemHead needs 0 <= label_smoothing < 1, got {label_smoothing}")
        if label_smoothing and loss != "ce":
            # sampled negatives are a different set per batch and accidental hits score -inf
            raise RecsysError("NextItemHead label_smoothing works with loss='ce' (the full softmax) only")
        if loss == "sampled" and n_negatives < 1:
            raise RecsysError(f"sampled softmax needs n_negatives >= 1, got {n_negatives}")
        self.loss_type = loss
        self.n_negatives = n_negatives
        self.logq = logq
        self.mask_history = mask_history
        self.seen_bias = nn.Parameter(torch.zeros(())) if seen_bias else None
        self.transition_weight = nn.Parameter(torch.zeros(())) if transition_prior else None
        # one weight per lag 2..transition_lags (without the prior, as n_negatives without loss=sampled,
        # the lags are unused); a separate parameter, so runs without lags load as before
        lags = transition_lags if transition_prior else 1
        self.earlier_transition_weights = nn.Parameter(torch.zeros(lags - 1)) if lags > 1 else None
        self.transitions: TransitionTable | None = None
        self.attribute_weight = nn.Parameter(torch.zeros(())) if attribute_prior else None
        self.attribute_max_items = check_max_items(attribute_max_items)
        self.shared_attributes: TransitionTable | None = None
        self.contrastive_weight = float(contrastive_weight)
        self.contrastive_temperature = float(contrastive_temperature)
        self.label_smoothing = float(label_smoothing)
        self.future_steps = future_steps
        self.future_weight = float(future_weight)

    def contrastive_loss(self, first: Tensor, second: Tensor, targets: Tensor) -> Tensor:
        """InfoNCE between two dropout views (N, d) of the same N positions: position i of one view
        must pick out, among the N of the other, itself and every position with the same next item
        (the positives; in-batch negatives otherwise), in both directions."""
        logits = first @ second.T / self.contrastive_temperature
        positive = (targets[:, None] == targets[None, :]).to(logits.dtype)
        per_positive = positive / positive.sum(1, keepdim=True)
        both = torch.cat([logits.log_softmax(1), logits.T.log_softmax(1)])
        return -(both * per_positive.repeat(2, 1)).sum(1).mean()

    def attach_transitions(self, table: TransitionTable) -> None:
        """The training data's transition counts, for a head with transition_prior (before loading
        a checkpoint into it: the table's size must match the saved one)."""
        self.transitions = table

    def attach_attributes(self, item_attributes: Tensor | None) -> None:
        """The encoder's (n_items + 1, K) item attributes, for a head with attribute_prior: the
        table of items sharing them is built here (and again wherever the model is loaded)."""
        if item_attributes is None:
            raise RecsysError(
                "head.attribute_prior=true needs item attributes: set data.item_attributes (an item -> "
                "attribute ids file), or head.attribute_prior=false"
            )
        self.shared_attributes = shared_attribute_table(item_attributes, self.attribute_max_items)

    @property
    def uses_history(self) -> bool:
        return any(w is not None for w in (self.seen_bias, self.transition_weight, self.attribute_weight))

    @property
    def needs_attributes(self) -> bool:
        return self.attribute_weight is not None

    @property
    def needs_transitions(self) -> bool:
        return self.transition_weight is not None

    def score_terms(self, history: History | None) -> list[SparseScore]:
        """Everything this head adds to the encoder's dot products, for the rows of `history`: the
        one place the loss, ranking and pair scoring take them from."""
        if not self.uses_history:
            return []
        if history is None:
            raise RecsysError(
                "NextItemHead with seen_bias, transition_prior or attribute_prior scores with a History: "
                "what each row has seen (models.score_terms.History)"
            )
        terms = []
        if self.seen_bias is not None:
            terms.append(SparseScore(self.seen_bias, SeenColumns(history)))
        if self.transition_weight is not None:
            if self.transitions is None:
                raise RecsysError(
                    "NextItemHead(transition_prior=True) has no transition table: attach_transitions(table) "
                    "with the training data's counts (runs.build_model does)"
                )
            terms.append(SparseScore(self.transition_weight, TransitionColumns(self.transitions, history)))
            if self.earlier_transition_weights is not None:
                for i, weight in enumerate(self.earlier_transition_weights):
                    terms.append(SparseScore(weight, TransitionColumns(self.transitions, history, lag=i + 2)))
        if self.attribute_weight is not None:
            if self.shared_attributes is None:
                raise RecsysError(
                    "NextItemHead(attribute_prior=True) has no shared-attribute table: attach_attributes"
                    "(encoder.item_attributes) (runs.build_model does)"
                )
            columns = TransitionColumns(self.shared_attributes, history, leave_one_out=False)
            terms.append(SparseScore(self.attribute_weight, columns))
        return terms

    def loss(
        self,
        encoder: SequenceEncoder,
        hidden: Tensor,
        targets: Tensor,
        history: History | None = None,
        item_log_probs: Tensor | None = None,
    ) -> Tensor:
        """Mean loss over the non-padding targets; hidden (N, d), targets (N,), history: one row per
        target (what each has seen, and the item it has just seen), needed when `uses_history`.

        item_log_probs (n_items + 1,): log of the distribution negatives are drawn from (e.g. item
        popularity), finite for every item that can be a target (smooth zero counts); None means
        uniform. Only used by the sampled loss.
        """
        keep = targets != 0
        hidden, targets = hidden[keep], targets[keep]
        history = history.subset(keep) if history is not None and self.uses_history else None
        terms = self.score_terms(history)
        if targets.numel() == 0:
            return hidden.sum() * 0.0 + sum(term.weight * 0.0 for term in terms)
        if self.loss_type == "ce":
            return encoder.cross_entropy_all(hidden, targets, terms, self.label_smoothing)
        return self._sampled_loss(encoder, hidden, targets, item_log_probs, terms)

    def future_loss(
        self,
        encoder: SequenceEncoder,
        hidden: Tensor,
        targets: Tensor,
        item_log_probs: Tensor | None = None,
    ) -> Tensor:
        """The auxiliary loss of `future_steps`: hidden (B, L, d) of a training batch and its targets
        (B, L) (each position's next item, 0 where none), `future_weight` times the mean loss of each
        position against the item `step` events after its next one, for step 1..future_steps; 0 where
        there is none (the end of the row or padding)."""
        total = hidden.sum() * 0.0
        if not self.future_steps or not self.future_weight:
            return total
        for step in range(1, self.future_steps + 1):
            later = torch.zeros_like(targets)
            later[:, :-step] = targets[:, step:]
            ahead = (targets > 0) & (later > 0)
            if not ahead.any():
                continue
            if self.loss_type == "ce":
                loss = encoder.cross_entropy_all(hidden[ahead], later[ahead], (), self.label_smoothing)
            else:
                loss = self._sampled_loss(encoder, hidden[ahead], later[ahead], item_log_probs, [])
            total = total + self.future_weight * loss
        return total

    def _sampled_loss(
        self,
        encoder: SequenceEncoder,
        hidden: Tensor,
        targets: Tensor,
        item_log_probs: Tensor | None,
        terms: list[SparseScore],
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
        if terms:
            # the transition prior leaves the pair being predicted out, as in the full loss
            pos_logits = pos_logits + sparse_scores_at(targets[:, None], terms)
            neg_logits = neg_logits + sparse_scores_at(negatives[None, :].expand(len(targets), -1), terms)
        if self.logq:
            pos_logits = pos_logits - log_q[targets][:, None]
            neg_logits = neg_logits - log_q[negatives][None, :]
        neg_logits = neg_logits.masked_fill(
            negatives[None, :] == targets[:, None], float("-inf")
        )  # accidental hits
        logits = torch.cat([pos_logits, neg_logits], dim=1)
        return F.cross_entropy(logits, torch.zeros_like(targets))

    def rank_scores(self, encoder: SequenceEncoder, hidden: Tensor, history: History | None = None) -> Tensor:
        """Scores of every item (B, n_items + 1) after each row's history, column 0 -inf. Masking the
        history (the masked protocol, `mask_history`) is the caller's: it knows the whole history."""
        return add_sparse_scores(encoder.score_all(hidden), self.score_terms(history))

    def candidate_scores(
        self, encoder: SequenceEncoder, hidden: Tensor, items: Tensor, history: History | None = None
    ) -> Tensor:
        """Scores of given items (B, K) after each row's history (B rows): the ranking scores of
        exactly those columns."""
        scores = encoder.score_candidates(hidden, items)
        extra = sparse_scores_at(items, self.score_terms(history))
        return scores if extra is None else scores + extra


class CTRHead(Head):
    """Click probability of a candidate item given the encoded history.

    Inputs to the MLP are [h, e, h*e] with h the hidden state at the last real event and e the
    candidate's embedding (item + category); with target_attention, a DIN-style pooled vector of
    the history weighted by relevance to the candidate is appended; with `n_users` > 0, the user's
    own embedding u and u*e too (what a non-sequential DNN knows, so that a comparison with one is
    about the sequence, not about the id). Trained with BCE, whose minimiser is the true click
    probability, so sigmoid(logit) is used as the CTR estimate; `base_rate` starts the output bias at
    the training click rate.
    """

    def __init__(
        self,
        d_model: int,
        mlp_dims: Sequence[int] = (200, 80),
        dropout: float = 0.1,
        target_attention: bool = True,
        attention_dim: int = 64,
        base_rate: float | None = None,
        n_users: int = 0,
    ) -> None:
        """n_users: the users of the training data (user ids 1..n_users, 0 = unknown); 0 for none."""
        super().__init__()
        self.target_attention = target_attention
        if target_attention:
            # DIN's local activation unit: scores each history state against the candidate.
            self.attention = nn.Sequential(
                nn.Linear(4 * d_model, attention_dim), nn.ReLU(), nn.Linear(attention_dim, 1)
            )
        layers: list[nn.Module] = []
        width = (4 if target_attention else 3) * d_model + (2 * d_model if n_users > 0 else 0)
        for dim in mlp_dims:
            layers += [nn.Linear(width, dim), nn.ReLU(), Dropout(dropout)]
            width = dim
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        if base_rate is not None:
            if not 0.0 < base_rate < 1.0:
                raise RecsysError(f"base_rate must be in (0, 1), got {base_rate}")
            nn.init.constant_(self.mlp[-1].bias, float(torch.logit(torch.tensor(base_rate))))
        self.n_users = n_users
        self.user_emb = nn.Embedding(n_users + 1, d_model, padding_idx=0) if n_users > 0 else None
        if self.user_emb is not None:
            nn.init.normal_(self.user_emb.weight, std=0.02)
            with torch.no_grad():
                self.user_emb.weight[0].zero_()

    def forward(
        self,
        encoder: SequenceEncoder,
        hidden: Tensor,
        mask: Tensor,
        cand_items: Tensor,
        cand_categories: Tensor | None = None,
        users: Tensor | None = None,
    ) -> Tensor:
        """hidden (B, L, d), mask (B, L) True at real events, candidates (B,) -> logits (B,); users (B,):
        each row's user id, for a head with user embeddings (required there; an id beyond the
        training users counts as unknown, 0).

        A row without any real event has h = 0 (and a zero pooled vector): the prediction then
        rests on the candidate (and the user) alone.
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
        if self.user_emb is not None:
            if users is None or users.shape != cand_items.shape:
                raise RecsysError("CTRHead with user embeddings needs users (B,): each row's user id")
            known = users.where(users < self.user_emb.num_embeddings, 0)
            u = self.user_emb(known)
            features += [u, u * e]
        return self.mlp(torch.cat(features, dim=-1)).squeeze(-1)

    @staticmethod
    def loss(logits: Tensor, labels: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
