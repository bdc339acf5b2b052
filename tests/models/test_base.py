"""The shared encoder contract, checked on every registered encoder."""

from __future__ import annotations

import math

import pytest
import torch

from recsys_mamba.errors import RecsysError
from recsys_mamba.models import NextItemHead
from recsys_mamba.models.base import Dropout
from tests.models.conftest import make_encoder, random_batch, user_sequences


def test_shapes_and_padding_outputs_zero(encoder_name: str) -> None:
    model = make_encoder(encoder_name)
    items, cats, events = random_batch()
    hidden = model(items, cats, events)
    assert hidden.shape == (4, 12, 16)
    assert torch.equal(hidden[items == 0], torch.zeros_like(hidden[items == 0]))
    assert torch.equal(model.encode({"items": items, "categories": cats, "event_types": events}), hidden)
    scores = model.score_all(hidden[:, -1])
    assert scores.shape == (4, 31)
    assert torch.isneginf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()
    cands = torch.tensor([[1, 2, 3]] * 4)
    torch.testing.assert_close(model.score_candidates(hidden[:, -1], cands), scores[:, 1:4])


def test_last_hidden_is_forward_at_each_rows_last_event(encoder_name: str) -> None:
    model = make_encoder(encoder_name)
    items, cats, events = random_batch(lengths=(12, 7, 0, 1))
    with torch.no_grad():
        full = model(items, cats, events)
        last = model.encode_last({"items": items, "categories": cats, "event_types": events})
    torch.testing.assert_close(last, full[torch.arange(4), torch.tensor([11, 6, 0, 0])], rtol=1e-5, atol=1e-5)
    assert (last[2] == 0).all()


def test_side_features_change_the_output(encoder_name: str) -> None:
    model = make_encoder(encoder_name)
    items, cats, events = random_batch()
    assert not torch.allclose(model(items, cats, events), model(items))


def test_padding_invariance(encoder_name: str) -> None:
    """The same real prefix with more padding (and padding side inputs) gives the same outputs."""
    model = make_encoder(encoder_name)
    items, cats, events = random_batch(lengths=(5, 3, 8, 1), width=8)
    wide = model(*(torch.nn.functional.pad(t, (0, 9)) for t in (items, cats, events)))
    torch.testing.assert_close(wide[:, :8], model(items, cats, events), rtol=0, atol=1e-6)


def test_causality(encoder_name: str) -> None:
    model = make_encoder(encoder_name)
    items, cats, events = random_batch(lengths=(12, 12), width=12)
    changed = items.clone()
    changed[:, 6:] = changed[:, 6:] % 30 + 1
    a, b = model(items, cats, events), model(changed, cats, events)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_step_equals_forward(encoder_name: str) -> None:
    """Stepping a right-padded batch event by event reproduces the full forward at every position."""
    model = make_encoder(encoder_name)
    items, cats, events = random_batch()
    full = model(items, cats, events)
    state = model.init_state(4)
    steps = []
    for t in range(items.shape[1]):
        hidden, state = model.step(items[:, t], state, cats[:, t], events[:, t])
        steps.append(hidden)
    assert (torch.stack(steps, 1) - full).abs().max() <= 1e-5


def test_prefill_is_the_state_after_each_rows_events(encoder_name: str) -> None:
    """One pass over a padded batch gives the state stepping would: the next event's output equals
    the forward pass over the history plus that event, row by row (padded rows too)."""
    model = make_encoder(encoder_name)
    items, categories, event_types = random_batch(lengths=(6, 4, 1), width=6)
    state = model.prefill(items, categories, event_types)
    lengths = (items != 0).sum(1)
    new = torch.tensor([7, 8, 9])
    with torch.no_grad():
        out, _ = model.step(new, state, torch.tensor([1, 2, 3]), torch.tensor([1, 1, 2]))
    for row, n in enumerate(lengths.tolist()):
        full_items = torch.cat([items[row, :n], new[row : row + 1]])[None]
        full_cats = torch.cat([categories[row, :n], torch.tensor([row + 1])])[None]
        full_types = torch.cat([event_types[row, :n], torch.tensor([[1, 1, 2][row]])])[None]
        with torch.no_grad():
            want = model(full_items, full_cats, full_types)[0, -1]
        torch.testing.assert_close(out[row], want, rtol=1e-4, atol=1e-5)


def test_state_save_load_round_trip(encoder_name: str) -> None:
    model = make_encoder(encoder_name)
    items, cats, events = random_batch(lengths=(6, 6), width=6)
    state = model.init_state(2)
    for t in range(5):
        _, state = model.step(items[:, t], state, cats[:, t], events[:, t])
    loaded = model.load_state(model.save_state(state))
    assert loaded.keys() == state.keys()
    a, _ = model.step(items[:, 5], state, cats[:, 5], events[:, 5])
    b, _ = model.step(items[:, 5], loaded, cats[:, 5], events[:, 5])
    assert torch.equal(a, b)


def test_states_are_stored_without_pickle_and_old_torch_save_blobs_still_load(encoder_name: str) -> None:
    import io

    from safetensors.torch import load

    model = make_encoder(encoder_name)
    items, cats, events = random_batch(lengths=(4,), width=4)
    state = model.init_state(1)
    for t in range(4):
        _, state = model.step(items[:, t], state, cats[:, t], events[:, t])
    blob = model.save_state(state)
    assert all(torch.equal(v, state[k]) for k, v in load(blob).items())  # plain safetensors bytes
    legacy = io.BytesIO()
    torch.save({k: v.detach() for k, v in state.items()}, legacy)  # how earlier versions stored states
    loaded = model.load_state(legacy.getvalue())
    assert loaded.keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in loaded.items())


def test_per_user_states_stored_and_merged(encoder_name: str) -> None:
    """Users streamed one by one, kept as bytes, then merged into one batch continue exactly."""
    model = make_encoder(encoder_name)
    items, cats, events = random_batch(lengths=(9, 4, 6), width=9)
    full = model(items, cats, events)
    seen = torch.tensor([8, 3, 5])
    blobs = []
    for user, n in enumerate(seen.tolist()):
        state = model.init_state(1)
        for t in range(n):
            _, state = model.step(
                items[user : user + 1, t], state, cats[user : user + 1, t], events[user : user + 1, t]
            )
        blobs.append(model.save_state(state))
    merged = model.merge_states([model.load_state(blob) for blob in blobs])
    rows = torch.arange(3)
    hidden, _ = model.step(items[rows, seen], merged, cats[rows, seen], events[rows, seen])
    assert (hidden - full[rows, seen]).abs().max() <= 1e-5
    parts = model.split_state(merged)
    assert len(parts) == 3
    assert all(torch.equal(v, merged[k]) for k, v in model.merge_states(parts).items())


def test_step_on_padding_keeps_the_state(encoder_name: str) -> None:
    model = make_encoder(encoder_name)
    state = model.init_state(2)
    _, state = model.step(torch.tensor([3, 4]), state)
    hidden, after = model.step(torch.tensor([0, 5]), state)
    assert torch.equal(hidden[0], torch.zeros(16))
    a, _ = model.step(torch.tensor([7, 7]), state)
    b, _ = model.step(torch.tensor([7, 7]), after)
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_no_weight_decay_names_are_parameters(encoder_name: str) -> None:
    model = make_encoder(encoder_name)
    names = dict(model.named_parameters())
    no_decay = model.no_weight_decay()
    assert no_decay <= names.keys()
    assert "item_emb.weight" not in no_decay
    assert all(names[n].dim() >= 2 for n in names.keys() - no_decay)


def test_gradient_checkpointing_same_gradients(encoder_name: str) -> None:
    items, cats, events = random_batch()
    grads = []
    for flag in (False, True):
        model = make_encoder(encoder_name, gradient_checkpointing=flag).train()
        model(items, cats, events).pow(2).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (torch.tensor([[1, 2, 31]]), r"\[0, 30\]"),
        (torch.tensor([[1, -1, 2]]), r"\[0, 30\]"),
        (torch.tensor([[1.0, 2.0]]), "dtype"),
        (torch.zeros(2, 0, dtype=torch.long), "empty"),
        (torch.zeros(0, 5, dtype=torch.long), "empty"),
        (torch.tensor([1, 2, 3]), r"\(batch, length\)"),
        (torch.tensor([[0, 0, 4]]), "right-padded"),
    ],
)
def test_bad_input_clear_error(encoder_name: str, items: torch.Tensor, message: str) -> None:
    with pytest.raises(RecsysError, match=message):
        make_encoder(encoder_name)(items)


def test_bad_side_input_and_step_input(encoder_name: str) -> None:
    model = make_encoder(encoder_name)
    items = torch.tensor([[1, 2, 3]])
    with pytest.raises(RecsysError, match=r"categories ids must lie in \[0, 5\]"):
        model(items, categories=torch.tensor([[1, 9, 1]]))
    with pytest.raises(RecsysError, match="shape of items"):
        model(items, event_types=torch.tensor([[1, 1]]))
    with pytest.raises(RecsysError, match=r"\(batch,\)"):
        model.step(items, model.init_state(1))
    with pytest.raises(RecsysError, match="candidate items"):
        model.score_candidates(torch.zeros(1, 16), torch.tensor([[99]]))


@pytest.mark.real_data
def test_overfits_a_tiny_ml100k_batch(encoder_name: str, ml100k) -> None:
    """16 real users, 20 events each: next-item cross-entropy must fit the training transitions."""
    seqs, _, n_items = user_sequences(ml100k, n_users=16, length=21)
    inputs, targets = seqs[:, :-1], seqs[:, 1:]
    model = make_encoder(encoder_name, n_items=n_items, n_categories=0, n_event_types=0, d_model=32).train()
    head = NextItemHead()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss = head.loss(model, model(inputs).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model.score_all(model(inputs)).argmax(-1) == targets).float().mean().item()
    assert accuracy > 0.9, f"train top-1 accuracy {accuracy:.2f} after 200 steps"


def test_dropout_keeps_one_minus_p_and_rescales_to_an_unbiased_mean():
    torch.manual_seed(0)
    drop = Dropout(0.2).train()
    x = torch.ones(400_000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.003
    scale = y[kept][0].item()
    assert abs(scale - 1 / 0.8) < 1e-4  # p on a 1/65536 grid
    assert torch.equal(y[kept], torch.full_like(y[kept], scale))
    assert abs(scale * (1 - math.ceil(0.2 * 65536) / 65536) - 1) < 1e-6  # scale = 1 / P(keep) exactly
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # d(x * mask * scale)/dx = mask * scale


def test_dropout_noise_is_uniform_in_every_16_bit_lane_of_a_draw():
    # Four elements share one 64-bit draw; a draw without its top bit would keep every 4th element.
    torch.manual_seed(1)
    kept = Dropout(0.5).train()(torch.ones(400_000)) != 0
    for lane in range(4):
        assert abs(kept[lane::4].float().mean().item() - 0.5) < 0.005, lane


@pytest.mark.parametrize("shape", [(1,), (3,), (5, 7), (2, 3, 5)])
def test_dropout_handles_sizes_that_are_not_a_multiple_of_four(shape):
    torch.manual_seed(2)
    y = Dropout(0.1).train()(torch.ones(shape))
    assert y.shape == shape and ((y == 0) | (y > 1)).all()


def test_dropout_is_identity_in_eval_or_at_zero_and_zeroes_at_one():
    x = torch.randn(4, 5)
    assert torch.equal(Dropout(0.5).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))


def test_dropout_masks_follow_the_seed():
    x = torch.randn(64, 32)
    masks = []
    for _ in range(2):
        torch.manual_seed(7)
        masks.append(Dropout(0.3).train()(x) != 0)
    assert torch.equal(masks[0], masks[1]) and not masks[0].all()


def test_item_dropout_zeroes_whole_items_in_training_only(encoder_name: str) -> None:
    model = make_encoder(encoder_name, item_dropout=0.5)
    items, cats, events = random_batch(lengths=(12, 12, 12, 12))
    full = model.item_vectors(items)
    with torch.no_grad():
        assert torch.equal(model.embed(items), full)  # eval: no dropout
        model.train()
        torch.manual_seed(3)
        dropped = model.embed(items)
    zero_rows = (dropped == 0).all(-1)
    # every position is either its whole item vector or all zeros, never a part of one
    assert torch.equal(dropped[~zero_rows], full[~zero_rows])
    assert 0.3 < zero_rows.float().mean().item() < 0.7
    with torch.no_grad():
        side = model.embed(items, cats, events)
    # side features are kept where the item is dropped
    assert (side.abs().sum(-1) > 0).all()


@pytest.mark.parametrize("bad", [-0.1, 1.0])
def test_item_dropout_out_of_range_is_refused(bad: float) -> None:
    with pytest.raises(RecsysError, match="item_dropout"):
        make_encoder("mamba", item_dropout=bad)
