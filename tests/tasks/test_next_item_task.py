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
