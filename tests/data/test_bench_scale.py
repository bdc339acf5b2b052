from __future__ import annotations

import json

import pytest

from recsys_mamba.bench import scale
from recsys_mamba.config import compose
from recsys_mamba.errors import RecsysError


def _cfg(tmp_path, *extra: str):
    return compose(
        "bench_scale",
        [
            "prepare.sizes=[3000,6000]",
            "prepare.events_per_user=30",
            "prepare.n_items=60",
            "prepare.chunk=1000",
            "prepare.run=['buckets=3']",
            f"work_dir={tmp_path / 'work'}",
            f"paths.log_dir={tmp_path / 'logs'}",
            *extra,
        ],
    )


def test_miniature_prepare_section(tmp_path):
    result = scale.bench(_cfg(tmp_path))
    cases = result["sections"]["prepare"]["cases"]
    assert [c["events_in"] for c in cases] == [3000, 6000]
    for case in cases:
        assert case["events_per_s"] > 0 and case["peak_rss_mib"] > 10 and case["buckets"] == 3
        # far too small a log to reach 2 M events/s: the goal check must say so
        assert case["goals"]["peak_rss_gb"]["value"] < 3 and case["goals"]["met"] is False
    assert not (tmp_path / "work").exists()
    json.dumps(result)


def test_sections_are_checked_before_any_work(tmp_path):
    for bad in ("sections=[]", "sections=[prepare,prepare]", "sections=[training]"):
        with pytest.raises(RecsysError, match="sections"):
            scale.validate_config(_cfg(tmp_path, bad))
    assert not (tmp_path / "work").exists()


def test_miniature_datamodule_section(tmp_path):
    cfg = _cfg(
        tmp_path,
        "sections=[datamodule]",
        "datamodule.data=['data=synthetic','data.synthetic.n_users=60','data.synthetic.n_items=40',"
        f"'paths.cache_dir={tmp_path / 'cache'}']",
        "datamodule.max_len=10",
        "datamodule.batch_size=16",
    )
    (named,) = scale.bench(cfg)["sections"]["datamodule"]["sets"]
    cases = named["cases"]
    assert [c["store"] for c in cases] == ["mapped", "memory", "memory_int64"]
    # every store gives the same batches, and the mapped one's arrays are file pages, not anonymous memory
    assert len({c["train_batches"] for c in cases}) == 1 and cases[0]["train_batches"] > 1
    for case in cases:
        assert case["peak_rss_mib"] > 0 and case["epoch_rss_mib"] > case["epoch_anon_mib"] > 0
    assert not (tmp_path / "work").exists()


@pytest.mark.slow  # ~60 s: trains a model and starts a Ray
def test_miniature_score_section(tmp_path):
    """Trains a tiny model, scores two generated inputs locally and one with engine=ray (1 worker)."""
    pytest.importorskip("ray")
    cfg = _cfg(
        tmp_path,
        "sections=[score]",
        "score.sizes=[3000,6000]",
        "score.events_per_user=30",
        "score.n_items=60",
        "score.chunk=1000",
        "score.train_events=3000",
        "score.ray_size=3000",
        "score.ray_workers=[1]",
        "score.run=['chunk_size=16','partition_events=1000']",
    )
    result = scale.bench(cfg)["sections"]["score"]
    assert [c["events"] for c in result["cases"]] == [3000, 6000]
    for case in [*result["cases"], *result["ray"]]:
        assert case["users"] > 0 and case["users_per_s"] > 0 and case["peak_rss_mib"] > 10
    assert [c["workers"] for c in result["ray"]] == [1] and result["ray"][0]["speedup_vs_first"] == 1.0
    assert result["peak_rss_max_over_min"] >= 1.0
    assert not (tmp_path / "work").exists()
    json.dumps(result)


def test_datamodule_section_on_a_generated_log(tmp_path):
    cfg = _cfg(
        tmp_path,
        "sections=[datamodule]",
        "datamodule.data=[]",
        "datamodule.generated=[3000]",
        "datamodule.stores=[mapped]",
        "datamodule.max_len=10",
        "datamodule.batch_size=16",
    )
    (generated,) = scale.bench(cfg)["sections"]["datamodule"]["sets"]
    assert generated["data"] == "generated 3,000 events" and "data=events" in generated["command"]
    # 3,000 events, 30 per user on average, all kept by the 5-core of the prepare block's data overrides
    assert 0 < generated["n_interactions"] <= 3000
    (case,) = generated["cases"]
    assert case["store"] == "mapped" and case["train_batches"] >= 100 // 16
    assert not (tmp_path / "work").exists()


def test_datamodule_section_needs_a_data_set(tmp_path):
    cfg = _cfg(tmp_path, "sections=[datamodule]", "datamodule.data=[]", f"out_file={tmp_path / 'out.json'}")
    with pytest.raises(RecsysError, match=r"datamodule\.generated"):
        scale.validate_config(cfg)
