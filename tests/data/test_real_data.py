"""Counts on the real public sets (skipped when ../shared/data is absent)."""

from __future__ import annotations

import polars as pl
import pytest

from recsys_mamba.config import compose
from recsys_mamba.data import format as fmt
from recsys_mamba.data import load_manifest, prepare

pytestmark = pytest.mark.real_data


def _prepare(name: str, shared, tmp_path, *overrides: str):
    cfg = compose("prepare", [f"data={name}", f"paths.shared_data_dir={shared}", *overrides])
    return prepare(cfg.data, None, tmp_path)


def _counts(out) -> tuple[int, int, int]:
    m = load_manifest(out)
    return m["n_users"], m["n_items"], m["n_interactions"]


def test_ml1m_standard_counts(shared, tmp_path):
    out = _prepare("ml1m", shared, tmp_path)
    assert _counts(out) == (6040, 3416, 999_611)
    m = load_manifest(out)
    assert m["dropped"] == {"min_item": 1_000_209 - 999_611}
    seqs = pl.read_parquet(out / fmt.SEQUENCES)
    assert seqs["items"].list.len().min() >= 3 and seqs.height == 6040
    # the file is in time order: user 1's sequence starts with MovieID 3186 (in the item map)
    items = pl.read_parquet(out / fmt.ITEM_MAP)
    first = items.filter(pl.col("item_idx") == seqs["items"][0][0])["item_id"].item()
    assert first == "3186"


def test_beauty_5core_counts(shared, tmp_path):
    out = _prepare("beauty", shared, tmp_path)
    assert _counts(out) == (22_363, 12_101, 198_502)
    assert load_manifest(out)["dropped"] == {}


def test_ml1m_ctr_labels_from_ratings(shared, tmp_path):
    out = _prepare("ml1m_ctr", shared, tmp_path)
    m = load_manifest(out)
    assert m["steps"][0]["rows_in"] == 487_650 and m["n_users"] == 2999
    assert m["n_interactions"] + sum(m["dropped"].values()) == 487_650
    inter = pl.read_parquet(out / fmt.INTERACTIONS)
    assert ((inter["rating"] >= 4).cast(pl.Int8) == inter["label"]).all()
    assert inter["timestamp"].min() >= 970_620_734
    assert pl.read_parquet(out / fmt.CTR).height == m["n_interactions"]


def test_ml100k(shared, tmp_path):
    out = _prepare("ml100k", shared, tmp_path, "data.filter.min_item=0", "data.filter.min_user=0")
    assert _counts(out) == (943, 1682, 100_000)


def test_recbole_inter_matches_u_data(shared, tmp_path):
    inter = _prepare(
        "events",
        shared,
        tmp_path,
        "data.format=recbole",
        "data.name=ml100k_inter",
        f"data.path={shared}/ml-100k/ml-100k.inter",
        "data.columns.rating=rating",
    )
    udata = _prepare(
        "ml100k", shared, tmp_path, "data.ctr=null", "data.filter.min_item=0", "data.filter.min_user=0"
    )
    assert _counts(inter) == (943, 1682, 100_000)
    assert pl.read_parquet(inter / fmt.INTERACTIONS).equals(pl.read_parquet(udata / fmt.INTERACTIONS))


def test_movielens_sample_file(shared, tmp_path):
    out = _prepare(
        "events",
        shared,
        tmp_path,
        "data.format=movielens",
        "data.name=mlsample",
        f"data.path={shared}/ml-1m/sample_movielens_rating.dat",
    )
    assert load_manifest(out)["n_interactions"] == 100_000


@pytest.mark.parametrize("name", ["ml1m", "ml1m_ctr"])
def test_bucket_count_does_not_change_a_byte(name, shared, tmp_path):
    """ML-1M (sequence file, item filter) and its CTR ratings (gzip, 5-core, labels): 1, 3 and 16
    buckets give byte-identical files and manifests (timing fields aside)."""
    from tests.data.test_fuzz_pipeline import folder_bytes

    cfg = compose("prepare", [f"data={name}", f"paths.shared_data_dir={shared}"])
    got = [folder_bytes(prepare(cfg.data, tmp_path / f"b{n}", tmp_path, buckets=n)) for n in (1, 3, 16)]
    assert got[0] == got[1] == got[2]
    manifest = got[0]["manifest.json"]
    kept = {"ml1m": 999_611, "ml1m_ctr": 487_650 - sum(manifest["dropped"].values())}
    assert manifest["n_interactions"] == kept[name]
