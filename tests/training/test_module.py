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
