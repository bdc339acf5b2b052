"""Next-click and CTR heads on top of an encoder."""

from __future__ import annotations

import polars as pl
import pytest
import torch
import torch.nn.functional as F

from recsys_mamba.errors import RecsysError
from recsys_mamba.models import CTRHead, NextItemHead
from recsys_mamba.models.score_terms import History, SeenColumns
from tests.models.conftest import make_encoder, random_batch


@pytest.fixture
def encoder():
    return make_encoder("sasrec")


def test_full_cross_entropy_ignores_padding_targets(encoder) -> None:
    hidden = torch.randn(5, 16)
    targets = torch.tensor([3, 0, 7, 30, 0])
    loss = NextItemHead("ce").loss(encoder, hidden, targets)
    keep = targets != 0
    torch.testing.assert_close(loss, F.cross_entropy(encoder.score_all(hidden[keep]), targets[keep]))
    empty = NextItemHead("ce").loss(encoder, hidden.requires_grad_(), torch.zeros(5, dtype=torch.long))
    empty.backward()
    assert empty.item() == 0.0 and torch.equal(hidden.grad, torch.zeros(5, 16))


def test_sampled_softmax_with_logq(encoder) -> None:
    torch.manual_seed(0)
    hidden, targets = torch.randn(6, 16, requires_grad=True), torch.tensor([1, 2, 3, 4, 5, 0])
    popularity = torch.arange(31.0) + 1
    log_probs = (popularity / popularity.sum()).log()
    losses = {}
    for logq in (True, False):
        torch.manual_seed(1)
        losses[logq] = NextItemHead("sampled", n_negatives=64, logq=logq).loss(
            encoder, hidden, targets, item_log_probs=log_probs
        )
    assert torch.isfinite(losses[True]) and losses[True] != losses[False]
    losses[True].backward()
    assert hidden.grad[:5].abs().sum() > 0 and torch.equal(hidden.grad[5], torch.zeros(16))
    uniform = NextItemHead("sampled", n_negatives=8).loss(encoder, hidden, targets)
    assert torch.isfinite(uniform)


def test_sampled_softmax_never_uses_the_target_as_a_negative() -> None:
    model = make_encoder("sasrec", n_items=1)  # every sampled negative is the target itself
    loss = NextItemHead("sampled", n_negatives=16).loss(model, torch.randn(3, 16), torch.tensor([1, 1, 1]))
    assert loss.item() == 0.0


def test_sampled_softmax_checks_the_distribution(encoder) -> None:
    with pytest.raises(RecsysError, match=r"\(31,\)"):
        NextItemHead("sampled").loss(
            encoder, torch.randn(2, 16), torch.tensor([1, 2]), item_log_probs=torch.zeros(30)
        )
    with pytest.raises(RecsysError, match="'ce' or 'sampled'"):
        NextItemHead("bpr")


def test_rank_scores_without_terms_are_the_encoders_scores(encoder) -> None:
    hidden, history = torch.randn(2, 16), History.last(torch.tensor([[4, 9, 0], [1, 0, 0]]))
    head = NextItemHead(mask_history=True)  # masking is the ranking protocol's, not the head's
    torch.testing.assert_close(head.rank_scores(encoder, hidden, history), encoder.score_all(hidden))
    assert not head.uses_history and head.score_terms(None) == []


def test_seen_bias_lifts_exactly_the_items_of_each_sequence(encoder) -> None:
    head = NextItemHead(seen_bias=True, mask_history=True)
    with torch.no_grad():
        head.seen_bias.fill_(-2.5)
    hidden, items = torch.randn(2, 16), torch.tensor([[4, 9, 4], [1, 0, 0]])
    seen = History.last(items, torch.tensor([3, 1]))
    scores = head.rank_scores(encoder, hidden, seen)
    difference = scores - encoder.score_all(hidden)
    expected = torch.zeros_like(difference)
    expected[0, [4, 9]] = expected[1, 1] = -2.5
    torch.testing.assert_close(difference[:, 1:], expected[:, 1:])
    with pytest.raises(RecsysError, match="seen"):
        head.rank_scores(encoder, hidden)
    with pytest.raises(RecsysError, match="seen"):
        head.loss(encoder, hidden, torch.tensor([2, 3]))


@pytest.mark.parametrize("loss", ["ce", "sampled"])
def test_seen_bias_learns_the_sign_of_repeat_behaviour(encoder, loss) -> None:
    """Targets that repeat an input pull the bias up, targets that never do push it down."""
    torch.manual_seed(0)
    items = torch.randint(1, 31, (8, 6))
    where = torch.ones_like(items, dtype=torch.bool)
    seen = History.causal(items, where)
    hidden = torch.randn(len(seen.rows), 16)
    repeats = items[seen.rows, (seen.positions - 1).clamp(min=0)]
    had = SeenColumns(seen).at(torch.arange(31).expand(len(seen.rows), -1))
    fresh = torch.tensor([next(i for i in range(1, 31) if not m[i]) for m in had])
    head = NextItemHead(loss, n_negatives=64, seen_bias=True)
    slopes = {}
    for name, targets in (("repeat", repeats), ("fresh", fresh)):
        (slopes[name],) = torch.autograd.grad(head.loss(encoder, hidden, targets, seen), head.seen_bias)
    assert slopes["repeat"] < 0 < slopes["fresh"]


@pytest.mark.parametrize("target_attention", [True, False])
def test_ctr_head_shapes_and_padding(encoder, target_attention: bool) -> None:
    head = CTRHead(16, mlp_dims=(8,), target_attention=target_attention).eval()
    items, cats, events = random_batch(lengths=(12, 7, 3, 0))
    hidden = encoder(items, cats, events)
    mask = items != 0
    cands, cand_cats = torch.tensor([1, 2, 3, 4]), torch.tensor([1, 1, 2, 0])
    logits = head(encoder, hidden, mask, cands, cand_cats)
    assert logits.shape == (4,) and torch.isfinite(logits).all()
    # Whatever sits at padded positions is ignored.
    noisy = torch.where(mask[..., None], hidden, torch.randn_like(hidden))
    torch.testing.assert_close(head(encoder, noisy, mask, cands, cand_cats), logits)
    assert head.loss(logits, torch.tensor([1, 0, 1, 0])).dim() == 0


def test_ctr_head_base_rate_and_errors(encoder) -> None:
    head = CTRHead(16, base_rate=0.1)
    assert head.mlp[-1].bias.item() == pytest.approx(torch.logit(torch.tensor(0.1)).item())
    with pytest.raises(RecsysError, match="base_rate"):
        CTRHead(16, base_rate=1.5)
    with pytest.raises(RecsysError, match="CTRHead expects"):
        head(encoder, torch.zeros(2, 16), torch.ones(2, 3, dtype=torch.bool), torch.tensor([1, 2]))


def test_ctr_head_user_embeddings(encoder) -> None:
    head = CTRHead(16, mlp_dims=(8,), n_users=3).eval()
    assert head.user_emb.num_embeddings == 4
    with torch.no_grad():
        head.user_emb.weight.normal_()  # as if trained; the initial scale barely moves the logits
    items, cats, events = random_batch(lengths=(5, 5, 5, 5))
    hidden = encoder(items, cats, events)
    mask = items != 0
    same = hidden[:1].expand(4, -1, -1)  # one history, one candidate: rows differ only in the user
    cands, cand_cats = torch.full((4,), 3), torch.full((4,), 1)
    logits = head(encoder, same, mask[:1].expand(4, -1), cands, cand_cats, torch.tensor([1, 2, 3, 0]))
    assert len(set(logits.tolist())) == 4
    # A user the training data did not have is the unknown user 0, whatever its id.
    unknown = head(encoder, same, mask[:1].expand(4, -1), cands, cand_cats, torch.tensor([0, 4, 99, 0]))
    torch.testing.assert_close(unknown, logits[3].expand(4))
    with pytest.raises(RecsysError, match="needs users"):
        head(encoder, hidden, mask, cands, cand_cats)
    # Without user embeddings the ids change nothing.
    plain = CTRHead(16, mlp_dims=(8,)).eval()
    assert plain.user_emb is None
    torch.testing.assert_close(
        plain(encoder, hidden, mask, cands, cand_cats, torch.tensor([1, 2, 3, 0])),
        plain(encoder, hidden, mask, cands, cand_cats),
    )


def ctr_examples(ratings: pl.DataFrame, width: int = 30):
    """Every (user, position >= 5) of the first `width` ratings: the history before it (ratings as
    event types), the item there as candidate, clicked when rated >= 4. Returns users and a
    function from example indices to (items, event_types, candidates, labels)."""
    seqs = ratings.group_by("user", maintain_order=True).agg(
        pl.col("item").head(width), pl.col("rating").head(width)
    )
    items, rates = (
        torch.tensor([x + [0] * (width - len(x)) for x in seqs[col].to_list()]) for col in ("item", "rating")
    )
    user, cut = (items[:, 5:] != 0).nonzero(as_tuple=True)
    cut = cut + 5

    def take(index: torch.Tensor):
        u, t = user[index], cut[index]
        before = torch.arange(width)[None, :] < t[:, None]
        return items[u] * before, rates[u] * before, items[u, t], (rates[u, t] >= 4).float()

    return user, take


@pytest.mark.real_data
def test_ctr_probabilities_are_calibrated_on_ml100k(ml100k) -> None:
    """Held-out users: mean predicted CTR matches the click rate, the binned calibration error is
    small and the log loss beats predicting the base rate."""
    user, take = ctr_examples(ml100k)
    train, test = (user % 4 != 0).nonzero()[:, 0], (user % 4 == 0).nonzero()[:, 0][:3000]
    rate = take(train)[3].mean().item()
    torch.manual_seed(0)
    encoder = make_encoder(
        "sasrec", n_items=int(ml100k["item"].max()), n_categories=0, n_event_types=5, dropout=0.2
    ).train()
    head = CTRHead(16, mlp_dims=(32,), dropout=0.2, base_rate=rate)
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=3e-3, weight_decay=0.01)
    for _ in range(60):
        x, e, c, y = take(train[torch.randint(0, len(train), (256,))])
        loss = head.loss(head(encoder, encoder(x, event_types=e), x != 0, c), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    encoder.eval(), head.eval()
    x, e, c, y = take(test)
    with torch.no_grad():
        p = torch.sigmoid(head(encoder, encoder(x, event_types=e), x != 0, c))
    bins = torch.clamp((p * 10).long(), max=9)
    ece = sum(
        (bins == b).sum() * (p[bins == b].mean() - y[bins == b].mean()).abs()
        for b in range(10)
        if (bins == b).any()
    ) / len(p)
    log_loss = F.binary_cross_entropy(p, y).item()
    base = F.binary_cross_entropy(torch.full_like(y, rate), y).item()
    assert abs(p.mean().item() - y.mean().item()) < 0.05
    assert ece < 0.06, f"expected calibration error {ece:.3f}"
    assert log_loss < base, f"log loss {log_loss:.4f} does not beat the base rate {base:.4f}"


def test_contrastive_loss_rewards_agreeing_views_and_counts_same_target_positives() -> None:
    torch.manual_seed(0)
    head = NextItemHead(contrastive_weight=0.1)
    views = torch.randn(8, 16) * 3
    targets = torch.arange(1, 9)
    agreeing = head.contrastive_loss(views, views, targets)
    assert agreeing < head.contrastive_loss(views, views[torch.randperm(8)], targets)
    # Distinct targets: each row's only positive is itself, a symmetric cross-entropy over the batch.
    logits = views @ views.T
    expected = (F.cross_entropy(logits, targets - 1) + F.cross_entropy(logits.T, targets - 1)) / 2
    torch.testing.assert_close(agreeing, expected)
    # Rows 0 and 1 share a next item: each is also a positive of the other.
    shared = targets.clone()
    shared[1] = shared[0]
    assert head.contrastive_loss(views, views, shared) != agreeing
    # Two rows, both positives of both: the mean log-probability over 2 positives x 2 rows x 2 directions.
    pair = logits[:2, :2]
    torch.testing.assert_close(
        head.contrastive_loss(views[:2], views[:2], shared[:2]),
        -(pair.log_softmax(1).sum() + pair.T.log_softmax(1).sum()) / 8,
    )


@pytest.mark.parametrize(("weight", "temperature"), [(-0.1, 1.0), (0.1, 0.0)])
def test_contrastive_settings_are_checked(weight: float, temperature: float) -> None:
    with pytest.raises(RecsysError, match="contrastive"):
        NextItemHead(contrastive_weight=weight, contrastive_temperature=temperature)


def test_label_smoothing_reaches_the_full_softmax_loss(encoder) -> None:
    hidden = torch.randn(6, 16)
    targets = torch.tensor([3, 0, 7, 30, 0, 2])
    keep = targets != 0
    loss = NextItemHead("ce", label_smoothing=0.2).loss(encoder, hidden, targets)
    scores = encoder.score_all(hidden[keep])[:, 1:]  # the padding column is no class
    torch.testing.assert_close(loss, F.cross_entropy(scores, targets[keep] - 1, label_smoothing=0.2))


@pytest.mark.parametrize(("loss", "eps"), [("ce", -0.1), ("ce", 1.0), ("sampled", 0.1)])
def test_label_smoothing_settings_are_checked(loss: str, eps: float) -> None:
    with pytest.raises(RecsysError, match="label_smoothing"):
        NextItemHead(loss, label_smoothing=eps)


def test_future_loss_scores_each_position_against_the_items_further_ahead(encoder) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 16)
    # row 0: next items 4, 9, 2, then padding; row 1: a single target
    targets = torch.tensor([[4, 9, 2, 0, 0], [7, 0, 0, 0, 0]])
    head = NextItemHead("ce", future_steps=2, future_weight=0.5)

    def ce(rows: list[tuple[int, int]], items: list[int]) -> torch.Tensor:
        h = torch.stack([hidden[r, p] for r, p in rows])
        return F.cross_entropy(encoder.score_all(h), torch.tensor(items))

    # step 1: position 0 -> 9, position 1 -> 2; step 2: position 0 -> 2; row 1 has nothing ahead
    expected = 0.5 * ce([(0, 0), (0, 1)], [9, 2]) + 0.5 * ce([(0, 0)], [2])
    torch.testing.assert_close(head.future_loss(encoder, hidden, targets), expected)
    assert NextItemHead("ce", future_steps=1, future_weight=0.0).future_loss(encoder, hidden, targets) == 0
    lone = torch.tensor([[4, 0, 0, 0, 0], [7, 0, 0, 0, 0]])
    assert head.future_loss(encoder, hidden, lone) == 0  # nothing beyond the next item


@pytest.mark.parametrize(("steps", "weight"), [(-1, 0.3), (1.5, 0.3), (True, 0.3), (1, -0.1)])
def test_future_settings_are_checked(steps, weight) -> None:
    with pytest.raises(RecsysError, match="future_"):
        NextItemHead(future_steps=steps, future_weight=weight)
