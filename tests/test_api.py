"""The Python API (`from recsys_mamba import Recommender`) on a tiny trained model and its exported
bundle: the same results as the scoring job, streaming equal to batch, a bundle that loads anywhere,
clear errors on bad input, and the README's snippet run as written."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys_mamba import Recommender
from recsys_mamba.config import compose
from recsys_mamba.errors import RecsysError
from recsys_mamba.scoring.job import score as score_job
from tests.scoring.conftest import train_tiny

README = Path(__file__).resolve().parents[1] / "README.md"
K = 5


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny trained next-item model (its checkpoint, prepared data and events) and its bundle."""
    from recsys_mamba.export import export

    trained = train_tiny(tmp_path_factory)
    bundle = tmp_path_factory.mktemp("export") / "bundle"
    export(compose("export", overrides=[f"ckpt_path={trained['ckpt']}", f"out_dir={bundle}"]))
    return {**trained, "bundle": bundle}


@pytest.fixture(scope="module")
def events(model: dict[str, Path]) -> pl.DataFrame:
    """The prepared events with integer ids (the synthetic data's ids are numbers)."""
    return pl.read_parquet(model["events"]).with_columns(pl.col("user_id", "item_id").cast(pl.Int64))


def job(model: dict[str, Path], out: Path, *overrides: str) -> pl.DataFrame:
    """`python -m recsys_mamba.score ckpt_path=<bundle>` in-process; its parts, read back."""
    base = [f"ckpt_path={model['bundle']}", f"output={out}", "progress=false"]
    score_job(compose("score", overrides=[*base, *overrides], return_hydra_config=False))
    return pl.concat([pl.read_parquet(f) for f in sorted(out.glob("*.parquet"))])


def assert_same(got: pl.DataFrame, want: pl.DataFrame, keys: tuple[str, ...]) -> None:
    """Same rows (ids compared as text) in the same order after sorting by `keys`; scores within 1e-5."""
    as_text = [pl.col("user_id", "item_id").cast(pl.String)]
    got, want = (f.with_columns(as_text).sort(keys, maintain_order=True) for f in (got, want))
    assert got["user_id"].to_list() == want["user_id"].to_list()
    assert got["item_id"].to_list() == want["item_id"].to_list()
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=0, atol=1e-5)


def test_recommend_and_score_equal_the_scoring_job(model, events, tmp_path: Path) -> None:
    rec = Recommender.load(model["bundle"])
    path = tmp_path / "events.parquet"
    events.write_parquet(path)
    top = rec.recommend(events, k=K, exclude_seen=True)
    assert top.columns == ["user_id", "item_id", "score", "rank", "cold"]
    assert top.schema["user_id"] == top.schema["item_id"] == pl.Int64  # the input's id type
    assert (
        top["user_id"].n_unique() == events["user_id"].n_unique()
        and len(top) == K * top["user_id"].n_unique()
    )
    assert_same(top, job(model, tmp_path / "topk", f"input={path}", f"top_k={K}"), ("user_id", "rank"))
    # pandas in, the same
    from_pandas = rec.recommend(events.to_pandas(), k=K)
    assert from_pandas.equals(top)

    # pairs: each user's last item and two others, one of them unknown to the model
    users = events["user_id"].unique().sort().head(8)
    pairs = pl.DataFrame(
        {
            "user_id": users.to_list() * 3,
            "item_id": rec.item_ids[:8] + rec.item_ids[8:16] + ["999999999"] * 8,
        }
    ).with_columns(pl.col("item_id").cast(pl.Int64))
    pairs_path = tmp_path / "pairs.parquet"
    pairs.write_parquet(pairs_path)
    scored = rec.score(pairs, history=events)
    assert scored.select("user_id", "item_id").equals(pairs)  # in the order given, ids of its type
    assert rec.last_unknown_items == 8
    assert scored.filter(~pl.col("known_item"))["score"].null_count() == 8
    want = job(model, tmp_path / "cand", "mode=candidates", f"input={pairs_path}", f"history={path}")
    assert_same(scored.drop_nulls("score"), want.drop_nulls("score"), ("user_id", "item_id"))


def test_streaming_one_event_at_a_time_equals_batch(model, events) -> None:
    rec = Recommender.load(model["bundle"], max_len=1000)  # batch: every event encoded, as the state has
    some = events.filter(pl.col("user_id").is_in(events["user_id"].unique().sort().head(6).implode()))
    state = rec.new_state()
    for row in some.sort("timestamp", maintain_order=True).iter_slices(1):
        state = rec.update(state, row)
    assert len(state) == 6 and state.unknown_items == 0
    live = rec.recommend(state, k=K)
    assert live.schema["user_id"] == pl.Int64
    assert_same(live, rec.recommend(some, k=K), ("user_id", "rank"))
    # one update with every event gives the same state; a user it has never seen gets the cold list
    whole = rec.update(rec.new_state(), some)
    assert_same(rec.recommend(whole, k=K), live, ("user_id", "rank"))
    cold = rec.recommend(state, k=K, users=[123456789])
    assert cold["cold"].all() and cold["user_id"].to_list() == [123456789] * K


@pytest.mark.parametrize("encoder", ["sasrec", "gru4rec"])
def test_streaming_through_each_encoders_own_step(encoder, tmp_path_factory) -> None:
    """SASRec (KV cache, up to its max_len) and GRU4Rec stream through their own `step` too."""
    trained = train_tiny(tmp_path_factory, f"model={encoder}", "model.d_model=16", "model.max_len=20")
    rec = Recommender.load(trained["ckpt"])
    events = pl.read_parquet(trained["events"])
    lengths = events.group_by("user_id").len()
    short = lengths.filter(pl.col("len") <= 20)["user_id"].sort().head(6)
    some = events.filter(pl.col("user_id").is_in(short.implode()))
    state = rec.new_state()
    for row in some.iter_slices(1):
        state = rec.update(state, row)
    live = rec.recommend(state, k=K)
    assert_same(live, rec.recommend(some, k=K), ("user_id", "rank"))
    long = events.filter(pl.col("user_id") == lengths.filter(pl.col("len") > 20)["user_id"][0])
    if encoder == "sasrec":  # its cache stops at max_len: a clear error, and the state unchanged
        with pytest.raises(RecsysError, match="max_len 20"):
            rec.update(state, pl.concat([some.head(1), long]))
        assert len(state) == 6 and rec.recommend(state, k=K).equals(live)
    else:
        assert len(rec.update(state, long)) == 7


def test_a_ctr_model_scores_click_probabilities_as_the_job(tmp_path_factory, tmp_path: Path) -> None:
    trained = train_tiny(tmp_path_factory, "experiment=ctr")
    rec = Recommender.load(trained["ckpt"], max_len=1000)
    assert rec.task == "ctr"
    events = pl.read_parquet(trained["events"])
    pairs = pl.DataFrame({"user_id": events["user_id"].unique().sort().head(6)}).join(
        pl.DataFrame({"item_id": rec.item_ids[:4]}), how="cross"
    )
    scored = rec.score(pairs, history=events)
    assert scored["score"].is_between(0, 1).all()
    events.write_parquet(tmp_path / "events.parquet")
    pairs.write_parquet(tmp_path / "pairs.parquet")
    want = job(
        {"bundle": trained["ckpt"]},
        tmp_path / "cand",
        "mode=candidates",
        f"input={tmp_path / 'pairs.parquet'}",
        f"history={tmp_path / 'events.parquet'}",
        "max_len=1000",
    )
    assert_same(scored, want, ("user_id", "item_id"))
    streamed = rec.recommend(rec.update(rec.new_state(), events), k=K)
    assert_same(streamed, rec.recommend(events, k=K), ("user_id", "rank"))


def test_a_moved_bundle_or_checkpoint_loads_without_environment(model, events, tmp_path, monkeypatch) -> None:
    import os

    for name in [n for n in os.environ if n.startswith("RECSYS_")]:
        monkeypatch.delenv(name)
    want = Recommender.load(model["bundle"]).recommend(events, k=K)
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(model["bundle"], tmp_path / "copy")
    moved.parent.mkdir()
    shutil.move(tmp_path / "copy", moved)
    assert Recommender.load(moved).recommend(events, k=K).equals(want)
    alone = tmp_path / "ckpt" / "model.ckpt"  # no config.yaml, no run folder beside it
    alone.parent.mkdir()
    shutil.copy(model["ckpt"], alone)
    assert_same(Recommender.load(alone).recommend(events, k=K), want, ("user_id", "rank"))


def test_bad_input_is_a_clear_error(model, events) -> None:
    rec = Recommender.load(model["bundle"])
    with pytest.raises(RecsysError, match=r"lacks column\(s\) \['item_id'\].*rename"):
        rec.recommend(events.drop("item_id"))
    with pytest.raises(RecsysError, match=r"lacks column\(s\) \['user_id'\]"):
        rec.score(events.select("item_id"))
    with pytest.raises(RecsysError, match=r"column 'user_id' is empty in 1 rows \(rows \[1\]"):
        rec.recommend(
            events.head(3).with_columns(
                pl.when(pl.int_range(3) == 0).then(None).otherwise("user_id").alias("user_id")
            )
        )
    with pytest.raises(RecsysError, match="column 'timestamp' must hold whole numbers"):
        rec.recommend(events.head(3).with_columns(pl.lit("soon").alias("timestamp")))
    with pytest.raises(RecsysError, match="expected a polars or pandas DataFrame"):
        rec.recommend("events.csv")
    with pytest.raises(RecsysError, match="k=0 must be an integer >= 1"):
        rec.recommend(events, k=0)
    with pytest.raises(RecsysError, match="new_state"):
        rec.update({}, events)
    with pytest.raises(RecsysError, match="unknown_items='bogus' must be one of"):
        Recommender.load(model["bundle"], unknown_items="bogus")
    with pytest.raises(RecsysError, match=r"ckpt_path=.* does not exist"):
        Recommender.load(model["bundle"].parent / "nothing.ckpt")

    # unknown items: ignored and counted (a user with only unknown items is cold), or refused
    odd = pl.DataFrame({"user_id": [1, 1, 2], "item_id": [int(rec.item_ids[0]), 999999999, 999999998]})
    top = rec.recommend(odd, k=K)
    assert rec.last_unknown_items == 2
    assert top.group_by("user_id").agg(pl.col("cold").first()).sort("user_id")["cold"].to_list() == [
        False,
        True,
    ]
    state = rec.update(rec.new_state(), odd)
    assert state.unknown_items == 2 and len(state) == 1
    strict = Recommender.load(model["bundle"], unknown_items="reject")
    with pytest.raises(
        RecsysError,
        match=r"2 item id\(s\) the model does not know in column 'item_id'.*unknown_items='ignore'",
    ):
        strict.recommend(odd)


def readme_snippet() -> str:
    """The ```python block under the README's "Python API" heading."""
    text = README.read_text()
    section = text[text.index("### Python API") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README: no ```python block under ### Python API"
    return match[1]


def test_readme_snippet_runs(model, tmp_path: Path, monkeypatch) -> None:
    shutil.copytree(model["bundle"], tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    exec(compile(readme_snippet(), "README.md", "exec"), names)  # the README's own code
    assert len(names["top"]) == 2 * 10 and names["top"]["rank"].to_list()[:3] == [1, 2, 3]
    assert names["scores"]["score"].null_count() == 0
    assert names["live"]["item_id"].to_list() == names["top"]["item_id"].to_list()
