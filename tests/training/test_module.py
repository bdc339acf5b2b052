import itertools
import math

import pytest
import torch

from recsys_mamba.models.heads import NextItemHead
from recsys_mamba.models.mamba import MambaEncoder
from recsys_mamba.training.module import RecLitModule, history_without_target, warmup_cosine


def test_warmup_then_cosine():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, total_steps=100, warmup_frac=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up over 10 steps
    assert all(a <= b for a, b in itertools.pairwise(lrs[:10]))
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lrs[-1] < 0.01


def test_no_decay_groups_follow_the_encoder():
    from functools import partial

    encoder = MambaEncoder(n_items=10, d_model=8, n_layers=1)
    module = RecLitModule(encoder, NextItemHead(), optimizer=partial(torch.optim.AdamW, weight_decay=0.1))
    decay, no_decay = module.parameter_groups()
    names = {id(p): n for n, p in module.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert no_decay_names == {f"encoder.{n}" for n in encoder.no_weight_decay()}
    assert no_decay["weight_decay"] == 0.0
    assert any(n.endswith("A_log") for n in no_decay_names)
    assert "encoder.item_emb.weight" in {names[id(p)] for p in decay["params"]}


def test_history_masking_never_hides_the_target():
    items = torch.tensor([[3, 4, 3, 0]])
    assert history_without_target(items, torch.tensor([3])).tolist() == [[0, 4, 0, 0]]


@pytest.mark.parametrize("mask_history", [False, True])
def test_eval_reports_both_protocols_and_masking_only_lifts_the_target(tiny, tmp_path, mask_history):
    from recsys_mamba.training.run import build

    cfg = tiny(tmp_path, ["task=next_item", f"head.mask_history={mask_history}"])
    dm, module = build(cfg)
    module.eval()
    for batch in dm.test_dataloader():
        with torch.no_grad():
            module._eval_step("test", batch)
    module.trainer = type("T", (), {"world_size": 1})()
    module.log_dict = lambda *a, **k: None
    module._eval_epoch_end("test")
    out, metrics = module.last_outputs["test"], module.last_metrics["test"]
    # Blanking seen items removes competitors and never the target, so no rank gets worse.
    assert (out["ranks_masked"] <= out["ranks_unmasked"]).all()
    primary = "masked" if mask_history else "unmasked"
    assert (out["ranks"] == out[f"ranks_{primary}"]).all()
    assert metrics["ndcg@10"] == metrics[f"{primary}_ndcg@10"]
    assert metrics["masked_hr@10"] >= metrics["unmasked_hr@10"]


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
        scores = module.rank_scores(test)
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
    store, n_train = dm.store, dm.n_train
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
        scores = module.rank_scores(test)
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
        scores = module.rank_scores(batch)
    rows, pos = test.rows[batch["index"].numpy()], test.target_pos[batch["index"].numpy()]
    assert (pos > 5).any()  # some histories are longer than the window, so the check below bites
    for i, (row, p) in enumerate(zip(rows, pos, strict=True)):
        history = set(test.store.flat["items"][test.store.start[row] : test.store.start[row] + p].tolist())
        target = int(batch["target"][i])
        masked = set(torch.isneginf(scores[i]).nonzero().flatten().tolist()) - {0}
        assert masked == history - {target}
