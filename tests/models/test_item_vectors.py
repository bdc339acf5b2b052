"""Item attributes as tied side features: every encoder scores and embeds item + mean(attributes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recsys_mamba.errors import RecsysError
from tests.models.conftest import make_encoder, random_batch

N_ITEMS = 30


def attribute_table(n_items: int = N_ITEMS) -> torch.Tensor:
    """Item i has attribute 1 + i % 4 and, for even i, also 5; the last item has none."""
    table = torch.zeros(n_items + 1, 2, dtype=torch.long)
    ids = torch.arange(1, n_items + 1)
    table[1:, 0] = 1 + ids % 4
    table[1:, 1] = torch.where(ids % 2 == 0, 5, 0)
    table[n_items] = 0
    return table


def test_item_vectors_add_the_mean_of_the_item_attributes(encoder_name: str) -> None:
    model = make_encoder(encoder_name, item_attributes=attribute_table())
    emb, attr = model.item_emb.weight, model.attribute_emb.weight
    vectors = model.item_vectors()
    assert model.n_attributes == 5
    assert torch.allclose(vectors[2], emb[2] + (attr[3] + attr[5]) / 2)  # two attributes: their mean
    assert torch.allclose(vectors[3], emb[3] + attr[4])  # one attribute
    assert torch.equal(vectors[N_ITEMS], emb[N_ITEMS])  # none: the item's own embedding
    assert not vectors[0].any()  # padding stays zero
    ids = torch.tensor([[4, 7, 0], [30, 1, 2]])
    assert torch.allclose(model.item_vectors(ids), vectors[ids])


def test_inputs_and_every_score_use_the_item_vectors(encoder_name: str) -> None:
    model = make_encoder(encoder_name, item_attributes=attribute_table())
    plain = make_encoder(encoder_name)
    items, categories, event_types = random_batch(N_ITEMS)
    hidden = model(items, categories, event_types)
    assert not torch.allclose(hidden, plain(items, categories, event_types))  # the inputs differ
    last = hidden[:, 0]
    scores = model.score_all(last)
    assert torch.allclose(scores[:, 1:], last @ model.item_vectors()[1:].t(), atol=1e-6)
    candidates = torch.tensor([[1, 2, 30]] * last.shape[0])
    assert torch.allclose(model.score_candidates(last, candidates), scores.gather(1, candidates), atol=1e-6)
    targets = torch.tensor([2, 5, 30, 1])
    ce = model.cross_entropy_all(last, targets)
    assert torch.allclose(ce, F.cross_entropy(scores[:, 1:], targets - 1), atol=1e-5)


def test_training_one_item_lifts_the_items_that_share_its_attributes() -> None:
    """The point of attributes: an item never trained as a target still moves with its attributes."""
    model = make_encoder("mamba", item_attributes=attribute_table()).train()
    items, categories, event_types = random_batch(N_ITEMS)
    optimizer = torch.optim.SGD([p for n, p in model.named_parameters() if n != "item_emb.weight"], lr=0.5)
    with torch.no_grad():
        before = model.score_all(model(items, categories, event_types)[:, 0])
    for _ in range(3):
        hidden = model(items, categories, event_types)[:, 0]
        loss = model.cross_entropy_all(hidden, torch.full((hidden.shape[0],), 6))  # attributes 3 and 5
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        gain = model.score_all(model(items, categories, event_types)[:, 0]) - before
    shares_both, shares_none = gain[:, 10].mean(), gain[:, 29].mean()  # item 10: attributes 3, 5; 29: 2
    assert shares_both > shares_none + 0.1


def test_the_attribute_table_travels_in_the_state_dict() -> None:
    table = attribute_table()
    model = make_encoder("sasrec", item_attributes=table)
    state = model.state_dict()
    assert torch.equal(state["item_attributes"], table)
    reordered = table.clone()
    reordered[1:] = table[1:].flip(0)
    other = make_encoder("sasrec", item_attributes=reordered)
    other.load_state_dict(state)
    assert torch.equal(other.item_attributes, table)
    assert torch.equal(other.item_vectors(), model.item_vectors())
    with pytest.raises(RuntimeError, match="attribute_emb"):
        make_encoder("sasrec").load_state_dict(state)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (torch.zeros(N_ITEMS, 2, dtype=torch.long), r"shape \(n_items \+ 1, K\)"),
        (torch.zeros(N_ITEMS + 1, dtype=torch.long), r"shape \(n_items \+ 1, K\)"),
        (torch.full((N_ITEMS + 1, 2), 0.5), "integer attribute ids"),
        (torch.zeros(N_ITEMS + 1, 2, dtype=torch.long), "at least one attribute"),
        (torch.cat([torch.ones(1, 2), attribute_table()[1:]]).long(), "row 0"),
        (attribute_table() - 2, "ids >= 1"),
    ],
)
def test_a_bad_attribute_table_is_refused_with_the_fix(table: torch.Tensor, message: str) -> None:
    with pytest.raises(RecsysError, match=message):
        make_encoder("mamba", item_attributes=table)
