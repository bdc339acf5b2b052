import numpy as np
import pytest

from recsys_mamba.training.baselines import bias_baseline, popularity_baseline
from recsys_mamba.training.run import build


@pytest.fixture(scope="module")
def ctr_dm(tmp_path_factory):
    from recsys_mamba.config import compose

    out = tmp_path_factory.mktemp("bias")
    cfg = compose("train", ["experiment=ctr", f"paths.output_dir={out}", f"paths.cache_dir={out / 'cache'}",
                            "data.synthetic.n_users=300", "data.synthetic.n_items=150"])
    dm, _ = build(cfg)
    return dm


def test_bias_baseline_learns_user_and_item_click_rates(ctr_dm):
    out = bias_baseline(ctr_dm)
    assert set(out) == {"baseline_bias_auc", "baseline_bias_gauc", "baseline_bias_logloss"}
    test = ctr_dm.datasets["test"]
    # Better than chance and than always predicting the training click rate.
    assert out["baseline_bias_auc"] > 0.55
    rate = float(ctr_dm.ctr_train["label"].mean())
    constant = -np.mean(test.labels * np.log(rate) + (1 - test.labels) * np.log(1 - rate))
    assert out["baseline_bias_logloss"] < constant


def test_bias_baseline_is_ctr_only(ctr_dm):
    ctr_dm.task = "next_item"
    try:
        assert bias_baseline(ctr_dm) == {}
    finally:
        ctr_dm.task = "ctr"
    assert "baseline_popularity_auc" in popularity_baseline(ctr_dm)
