import itertools
import math

import pytest
import torch

from recsys_mamba.models.heads import NextItemHead
from recsys_mamba.models.mamba import MambaEncoder
from recsys_mamba.training.module import RecLitModule, warmup_cosine


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


def _epoch_loss(module, loader) -> float:
    with torch.no_grad():
        return sum(float(module.training_step(batch, i)) for i, batch in enumerate(loader))


@pytest.mark.parametrize("weighting", ["batch", "target"])
def test_target_weighting_makes_the_epoch_loss_independent_of_how_rows_are_batched(tiny, tmp_path, weighting):
    from recsys_mamba.training.run import build

    cfg = tiny(tmp_path, ["task=next_item", "datamodule.batch_size=4", f"module.loss_weighting={weighting}"])
    dm, module = build(cfg)
    module.eval()  # no dropout: the same targets must give the same losses in either order
    with torch.no_grad():
        module.encoder.item_emb.weight.mul_(30)  # untrained, every target's loss is about log(n_items)
    module.log = lambda *a, **k: None
    module.trainer = type("T", (), {"datamodule": dm})()
    module.on_fit_start()
    train = dm.datasets["train"]
    rows = len(train) - len(train) % 4  # whole batches only: every batch has the same rows

    def loader(order):
        return [train[order[i : i + 4].tolist()] for i in range(0, rows, 4)]

    shuffled = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).numpy()[:rows]
    by_length = shuffled[train.lengths()[shuffled].argsort(kind="stable")]  # bucketing's extreme
    targets = sum(module.task.loss_targets(b) for b in loader(shuffled))
    assert train.targets_per_row() == pytest.approx(
        sum(module.task.loss_targets(train[[i]]) for i in range(len(train))) / len(train)
    )
    random_total, bucketed_total = (
        _epoch_loss(module, loader(shuffled)),
        _epoch_loss(module, loader(by_length)),
    )
    if weighting == "target":
        assert module.targets_per_row is not None and targets > 0
        assert bucketed_total == pytest.approx(random_total, rel=1e-5)
        # each target's loss counts 1 / (rows per batch x the training set's targets per row)
        weight, module.targets_per_row = 1 / (4 * module.targets_per_row), None
        single = [train[[int(i)]] for i in shuffled]
        per_target = sum(_epoch_loss(module, [b]) * module.task.loss_targets(b) for b in single)
        assert random_total == pytest.approx(per_target * weight, rel=1e-5)
    else:
        assert module.targets_per_row is None
        assert bucketed_total != pytest.approx(random_total, rel=1e-4)  # (0.3% apart here)


def test_target_weighting_needs_a_datamodule():
    from functools import partial

    from recsys_mamba.errors import RecsysError

    module = RecLitModule(
        MambaEncoder(n_items=10, d_model=8, n_layers=1),
        NextItemHead(),
        optimizer=partial(torch.optim.AdamW),
        loss_weighting="target",
    )
    module.trainer = type("T", (), {"datamodule": None})()
    with pytest.raises(RecsysError, match="loss_weighting=target"):
        module.on_fit_start()
    with pytest.raises(RecsysError, match="use batch or target"):
        RecLitModule(
            MambaEncoder(n_items=10, d_model=8, n_layers=1),
            NextItemHead(),
            optimizer=None,
            loss_weighting="x",
        )
