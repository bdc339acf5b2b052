"""The CTR task: its baselines, scored on exactly the test samples the model is scored on."""

import numpy as np
import pytest

from recsys_mamba.tasks import get_task
from recsys_mamba.training.run import build


@pytest.fixture(scope="module")
def ctr_run(tmp_path_factory):
    from recsys_mamba.config import compose

    out = tmp_path_factory.mktemp("bias")
    cfg = compose(
        "train",
        [
            "experiment=ctr",
            f"paths.output_dir={out}",
            f"paths.cache_dir={out / 'cache'}",
            "data.synthetic.n_users=300",
            "data.synthetic.n_items=150",
        ],
    )
    return build(cfg)


def test_bias_baseline_learns_user_and_item_click_rates(ctr_run):
    dm, module = ctr_run
    out = get_task("ctr").baselines(dm.prepared, dm.datasets, module)
    assert {"baseline_bias_auc", "baseline_bias_gauc", "baseline_bias_logloss"} <= set(out)
    popularity = {"baseline_popularity_auc", "baseline_popularity_gauc", "baseline_popularity_count_auc"}
    assert popularity <= set(out)
    test = dm.datasets["test"]
    # Better than chance and than always predicting the training click rate.
    assert out["baseline_bias_auc"] > 0.55
    rate = float(dm.datasets["train"].samples.frame["label"].mean())
    constant = -np.mean(test.labels * np.log(rate) + (1 - test.labels) * np.log(1 - rate))
    assert out["baseline_bias_logloss"] < constant


def test_the_next_item_task_has_no_bias_baseline():
    assert not any(k.startswith("baseline_bias") for k in get_task("next_item").summary_metrics())
    assert "bias" in get_task("ctr").baseline_names
