"""The next-click task: what it trains on, how it ranks, and the two ranking protocols."""

import itertools
import math

import pytest
import torch

from recsys_mamba.tasks.next_item import NextItemTask, history_without_target

TASK = NextItemTask()


def test_history_masking_never_hides_the_target():
    items = torch.tensor([[3, 4, 3, 0]])
    assert history_without_target(items, torch.tensor([3])).tolist() == [[0, 4, 0, 0]]


def test_seen_bias_is_trained_through_the_module_and_ranks_over_the_whole_history(tiny, tmp_path):
    from recsys_mamba.training.run import build

    cfg = tiny(tmp_path, ["task=next_item", "head.seen_bias=true", "datamodule.max_len=5"])
    dm, module = build(cfg)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module.log = lambda *a, **k: None
    module.training_step(batch, 0).backward()
    assert module.head.seen_bias.grad.abs() > 0  # the loss reaches the bias
    with torch.no_grad():
        module.head.seen_bias.fill_(-3.0)
    module.eval()
    test = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        scores = TASK.rank_scores(module, test)
        hidden = module.encoder.encode(test)
        plain = module.encoder.score_all(hidden[torch.arange(len(hidden)), test["lengths"] - 1])
    lifted = (scores - plain)[:, 1:]
    # Items met before the encoded window of 5 events are seen too: ranking lifts the whole history.
    assert any(set(h.tolist()) - set(w.tolist()) for h, w in zip(test["history"], test["items"], strict=True))
    for row, items in enumerate(test["history"]):
        in_history = torch.zeros(lifted.shape[1], dtype=torch.bool)
        in_history[items[items > 0] - 1] = True
        torch.testing.assert_close(lifted[row], -3.0 * in_history.float())


def test_transition_prior_counts_training_pairs_leaves_the_trained_pair_out_and_ranks_from_the_last_item(
    tiny, tmp_path
):
    from recsys_mamba.training.run import build

    cfg = tiny(tmp_path, ["task=next_item", "head.transition_prior=true"])
    dm, module = build(cfg)
    dm.setup("fit")
    store = dm.prepared.store
    n_train = store.training_lengths()
    counts: dict[tuple[int, int], int] = {}
    for start, n in zip(store.start, n_train, strict=True):
        train = store.flat["items"][start : start + n].tolist()
        for pair in itertools.pairwise(train):
            counts[pair] = counts.get(pair, 0) + 1
    table = module.head.transitions
    assert table.n_pairs == len(counts)
    batch = next(iter(dm.train_dataloader()))
    real = batch["targets"] > 0
    inputs, targets = batch["items"][real], batch["targets"][real]
    cols, values = table.successors(inputs, exclude=targets)
    got = torch.zeros(len(inputs), table.n_items + 1).scatter_add(1, cols, values.expm1())
    for row, (a, b) in enumerate(zip(inputs.tolist(), targets.tolist(), strict=True)):
        assert got[row, b] == pytest.approx(counts[a, b] - 1)  # each trained pair is a training pair
    module.log = lambda *a, **k: None
    module.training_step(batch, 0).backward()
    assert module.head.transition_weight.grad.abs() > 0  # the loss reaches the weight
    with torch.no_grad():
        module.head.transition_weight.fill_(2.0)
    module.eval()
    test = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        scores = TASK.rank_scores(module, test)
        hidden = module.encoder.encode(test)
        plain = module.encoder.score_all(hidden[torch.arange(len(hidden)), test["lengths"] - 1])
    last = test["items"][torch.arange(len(hidden)), test["lengths"] - 1].tolist()
    for row, a in enumerate(last):
        expected = torch.zeros(table.n_items + 1)
        for (src, dst), n in counts.items():
            if src == a:
                expected[dst] = 2.0 * math.log1p(n)
        torch.testing.assert_close((scores - plain)[row, 1:], expected[1:])


def test_masked_protocol_removes_the_whole_history_not_only_the_encoded_window(tiny, tmp_path):
    from recsys_mamba.training.run import build

    cfg = tiny(tmp_path, ["task=next_item", "head.mask_history=true", "datamodule.max_len=5"])
    dm, module = build(cfg)
    module.eval()
    test = dm.datasets["test"]
    batch = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        scores = TASK.rank_scores(module, batch)
    rows, pos = test.rows[batch["index"].numpy()], test.target_pos[batch["index"].numpy()]
    assert (pos > 5).any()  # some histories are longer than the window, so the check below bites
    for i, (row, p) in enumerate(zip(rows, pos, strict=True)):
        history = set(test.store.flat["items"][test.store.start[row] : test.store.start[row] + p].tolist())
        target = int(batch["target"][i])
        masked = set(torch.isneginf(scores[i]).nonzero().flatten().tolist()) - {0}
        assert masked == history - {target}


def test_contrastive_term_encodes_twice_in_training_only_and_changes_the_loss(tiny, tmp_path):
    from recsys_mamba.training.run import build

    cfg = tiny(tmp_path, ["task=next_item", "head.contrastive_weight=0.5"])
    dm, module = build(cfg)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    calls = []
    encode = module.encoder.encode
    module.encoder.encode = lambda b: calls.append(1) or encode(b)
    module.train()
    torch.manual_seed(0)
    with_term = TASK.loss(module, batch)
    assert len(calls) == 2
    with_term.backward()
    module.head.contrastive_weight = 0.0
    torch.manual_seed(0)
    plain = TASK.loss(module, batch)
    assert len(calls) == 3 and not torch.isclose(with_term, plain)
    module.head.contrastive_weight = 0.5
    module.eval()
    TASK.loss(module, batch)
    assert len(calls) == 4  # no second view outside training


def test_train_on_valid_trains_each_users_validation_event_and_counts_its_transition(tiny, tmp_path):
    from recsys_mamba.training.run import build

    datasets, tables = {}, {}
    for flag in (False, True):
        cfg = tiny(tmp_path / str(flag), ["task=next_item", "head.transition_prior=true"])
        cfg.datamodule.train_on_valid = flag
        dm, module = build(cfg)
        datasets[flag], tables[flag] = dm.datasets, module.head.transitions
    store = dm.prepared.store
    first = store.split_positions()
    with_valid = first[:, 1] >= 0
    assert with_valid.any()
    assert (datasets[False]["train"].n_train == store.training_lengths()).all()
    # Each user with a validation event trains one more target: that event.
    grown = datasets[True]["train"].n_train - datasets[False]["train"].n_train
    assert (grown[with_valid] == first[with_valid, 2] - first[with_valid, 1]).all()
    assert (grown[~with_valid] == 0).all()
    # The transition prior counts the pairs ending in a validation event too.
    assert tables[True].counts.sum() - tables[False].counts.sum() == grown[first[:, 1] >= 1].sum()
    # The held-out test rows do not change.
    for name in ("valid", "test"):
        assert (datasets[True][name].target_pos == datasets[False][name].target_pos).all()


ON_VALID = "datamodule.train_on_valid=true"
UNMONITORED = "callbacks.model_checkpoint.monitor=null"


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        ([ON_VALID], UNMONITORED),
        ([ON_VALID, UNMONITORED, "task=ctr"], "next_item"),
        ([ON_VALID, UNMONITORED], None),
    ],
)
def test_train_on_valid_needs_next_item_and_no_monitored_checkpoint(tiny, tmp_path, overrides, refused):
    from recsys_mamba.errors import RecsysError
    from recsys_mamba.training.schema import validate_config

    cfg = tiny(tmp_path, overrides)
    if refused is None:
        validate_config(cfg)
        return
    with pytest.raises(RecsysError, match=refused):
        validate_config(cfg)


def test_future_steps_add_to_the_training_loss_only(tiny, tmp_path):
    from recsys_mamba.training.run import build

    cfg = tiny(tmp_path, ["task=next_item", "head.future_steps=2", "head.future_weight=0.5"])
    dm, module = build(cfg)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert ((batch["targets"][:, 2:] > 0) & (batch["targets"][:, :-2] > 0)).any()  # something two ahead
    module.eval()  # the same encoding in both modes: only the future term differs
    plain = TASK.loss(module, batch)
    module.training = True
    with_term = TASK.loss(module, batch)
    hidden = module.encoder.encode(batch)
    extra = module.head.future_loss(module.encoder, hidden, batch["targets"])
    assert extra > 0
    torch.testing.assert_close(with_term, plain + extra)
