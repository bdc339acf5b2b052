"""The scoring job in-process: scores match the model, seen items, sharding, candidates, stream."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from recsys_mamba.config import compose
from recsys_mamba.errors import RecsysError
from recsys_mamba.runs import load_run
from recsys_mamba.scoring.job import score


def job(trained: dict[str, Path], out: Path, *overrides: str) -> Path:
    base = [f"ckpt_path={trained['ckpt']}", f"input={trained['events']}", f"output={out}", "progress=false"]
    return score(compose("score", overrides=base + list(overrides), return_hydra_config=False))


def read(folder: Path) -> pl.DataFrame:
    files = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith("state"))
    return pl.concat([pl.read_parquet(f) for f in files]).sort(["user_id", "rank"])


def user_sequence(trained: dict[str, Path], user_id: str) -> pl.DataFrame:
    """One user's row of the prepared sequences.parquet."""
    users = pl.read_parquet(trained["prepared"] / "user_map.parquet")
    idx = users.filter(pl.col("user_id").cast(pl.String) == user_id)["user_idx"].item()
    return pl.read_parquet(trained["prepared"] / "sequences.parquet").filter(pl.col("user_idx") == idx)


def model_scores(trained: dict[str, Path], user_id: str, max_len: int = 20) -> torch.Tensor:
    """The trained module's own ranking scores for one user's prepared history, its last `max_len`
    events encoded (plus the learned seen-item bias on every item of the whole history, when the
    head has one)."""
    module_state = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    model = load_run(trained["ckpt"])
    encoder_state = {k[8:]: v for k, v in module_state.items() if k.startswith("encoder.")}
    model.model.encoder.load_state_dict(encoder_state)
    seq = user_sequence(trained, user_id)
    batch = {
        k: torch.tensor([seq[k][0].to_list()[-max_len:]]) for k in ("items", "categories", "event_types")
    }
    with torch.no_grad():
        scores = model.model.encoder.score_all(model.model.encoder.encode(batch)[:, -1])[0]
    bias = module_state.get("head.seen_bias")
    if bias is not None:
        scores[torch.tensor(seq["items"][0].to_list()).unique()] += bias
    weight = module_state.get("head.transition_weight")
    if weight is not None:
        # the last item's successors, then (with transition_lags) those of the items before it
        earlier = module_state.get("head.earlier_transition_weights", torch.zeros(0))
        history = seq["items"][0].to_list()
        counts = transition_counts(trained["prepared"])
        for lag, lag_weight in enumerate([weight, *earlier], start=1):
            if lag > len(history):
                break
            for item, count in counts.get(history[-lag], {}).items():
                scores[item] += lag_weight * math.log1p(count)
    return scores


def transition_counts(prepared: Path) -> dict[int, Counter]:
    """item -> Counter of the items that came right after it in some user's training events."""
    seq = pl.read_parquet(prepared / "sequences.parquet")
    counts: dict[int, Counter] = {}
    for items, splits in zip(seq["items"].to_list(), seq["splits"].to_list(), strict=True):
        train = [item for item, split in zip(items, splits, strict=True) if split == 0]
        for a, b in itertools.pairwise(train):
            counts.setdefault(a, Counter())[b] += 1
    return counts


def test_topk_scores_equal_the_model_and_skip_seen(trained, tmp_path: Path) -> None:
    manifest = json.loads(job(trained, tmp_path / "a", "top_k=5", "chunk_size=16").read_text())
    out = read(tmp_path / "a")
    assert manifest["rows"] == len(out) == manifest["users"] * 5
    user = out["user_id"][0]
    rows = out.filter(pl.col("user_id") == user)
    expected = model_scores(trained, user)
    model = load_run(trained["ckpt"])
    idx = [model.data.items.index[i] for i in rows["item_id"]]
    np.testing.assert_allclose(rows["score"].to_numpy(), expected[idx].numpy(), rtol=1e-4, atol=1e-5)
    seen = pl.read_parquet(trained["events"]).filter(pl.col("user_id") == user)["item_id"]
    assert not set(rows["item_id"]) & set(seen)
    job(trained, tmp_path / "b", "top_k=5", "exclude_seen=false")
    unmasked = read(tmp_path / "b").filter(pl.col("user_id") == user)
    assert unmasked["score"][0] == pytest.approx(float(expected.max()), rel=1e-4)


def test_a_learned_seen_bias_scores_as_in_training(trained_seen_bias, tmp_path: Path) -> None:
    bias = torch.load(trained_seen_bias["ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    assert bias["head.seen_bias"] != 0  # trained, so the check below sees the bias at work
    job(trained_seen_bias, tmp_path / "t", "top_k=50", "exclude_seen=false")
    out = read(tmp_path / "t")
    model = load_run(trained_seen_bias["ckpt"])
    events = pl.read_parquet(trained_seen_bias["events"])
    # Users with items met only before the last max_len = 20 events: the bias must reach those too.
    recent = pl.col("item_id").tail(20).implode()
    long = events.group_by("user_id").agg(
        pl.col("item_id").head(pl.len() - 20).is_in(recent).not_().any().alias("older")
    )
    users = long.filter("older")["user_id"].sort().head(3)
    assert len(users) == 3
    for user in users:
        rows = out.filter(pl.col("user_id") == user)
        expected = model_scores(trained_seen_bias, user)
        idx = [model.data.items.index[i] for i in rows["item_id"]]
        np.testing.assert_allclose(rows["score"].to_numpy(), expected[idx].numpy(), rtol=1e-4, atol=1e-5)
    user = out["user_id"][0]
    seen = pl.read_parquet(trained_seen_bias["events"]).filter(pl.col("user_id") == user).tail(2)
    pairs = pl.DataFrame({"user_id": [user] * 2, "item_id": seen["item_id"]})
    pairs.write_parquet(tmp_path / "pairs.parquet")
    job(trained_seen_bias, tmp_path / "c", "mode=candidates", f"input={tmp_path / 'pairs.parquet'}")
    got = pl.concat([pl.read_parquet(f) for f in (tmp_path / "c").glob("*.parquet")])
    expected = model_scores(trained_seen_bias, user)[[model.data.items.index[i] for i in got["item_id"]]]
    np.testing.assert_allclose(got["score"].to_numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_a_learned_transition_prior_scores_as_in_training(trained_transitions, tmp_path: Path) -> None:
    state = torch.load(trained_transitions["ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    # trained, so the checks below see the prior at work, from the last item and the two before it
    assert state["head.transition_weight"] != 0 and (state["head.earlier_transition_weights"] != 0).all()
    job(trained_transitions, tmp_path / "t", "top_k=50", "exclude_seen=false")
    out = read(tmp_path / "t")
    model = load_run(trained_transitions["ckpt"])
    users = out["user_id"].unique().sort().head(3)
    for user in users:
        rows = out.filter(pl.col("user_id") == user)
        expected = model_scores(trained_transitions, user)
        idx = [model.data.items.index[i] for i in rows["item_id"]]
        np.testing.assert_allclose(rows["score"].to_numpy(), expected[idx].numpy(), rtol=1e-4, atol=1e-5)
    user = users[0]
    top = out.filter(pl.col("user_id") == user)["item_id"][:4]
    pairs = pl.DataFrame({"user_id": [user] * 4, "item_id": top})
    pairs.write_parquet(tmp_path / "pairs.parquet")
    job(trained_transitions, tmp_path / "c", "mode=candidates", f"input={tmp_path / 'pairs.parquet'}")
    got = pl.concat([pl.read_parquet(f) for f in (tmp_path / "c").glob("*.parquet")])
    expected = model_scores(trained_transitions, user)[[model.data.items.index[i] for i in got["item_id"]]]
    np.testing.assert_allclose(got["score"].to_numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_shards_cover_each_user_once(trained, tmp_path: Path) -> None:
    for i in range(3):
        job(trained, tmp_path, "top_k=2", f"shard={i}/3")
    out = read(tmp_path)
    per_user = out.group_by("user_id").len()
    n_users = pl.read_parquet(trained["events"])["user_id"].n_unique()
    assert len(per_user) == n_users and (per_user["len"] == 2).all()
    assert len(list(tmp_path.glob("_SUCCESS.shard-*-of-3"))) == 3


def test_cold_users_and_unknown_candidates(trained, tmp_path: Path) -> None:
    events = pl.DataFrame({"user_id": ["new"], "item_id": ["no-such-item"]})
    events.write_parquet(tmp_path / "cold.parquet")
    manifest = json.loads(job(trained, tmp_path / "o", f"input={tmp_path / 'cold.parquet'}").read_text())
    assert manifest["cold_users"] == 1 and manifest["unknown_history_items"] == 1
    model = load_run(trained["ckpt"])
    assert read(tmp_path / "o")["item_id"][0] == model.data.items.ids[int(np.argmax(model.data.items.counts))]

    known = pl.read_parquet(trained["events"]).head(1)
    pairs = pl.DataFrame({"user_id": [known["user_id"][0]] * 2, "item_id": [known["item_id"][0], "bogus"]})
    pairs.write_parquet(tmp_path / "pairs.parquet")
    manifest = json.loads(
        job(trained, tmp_path / "c", "mode=candidates", f"input={tmp_path / 'pairs.parquet'}").read_text()
    )
    out = pl.read_parquet(next((tmp_path / "c").glob("*.parquet"))).sort("known_item")
    assert manifest["unknown_candidate_items"] == 1
    assert out["known_item"].to_list() == [False, True] and out["score"].null_count() == 1
    expected = model_scores(trained, known["user_id"][0])[model.data.items.index[known["item_id"][0]]]
    assert out["score"][1] == pytest.approx(float(expected), rel=1e-4)


def test_stream_equals_full_encoding_and_state_reloads(trained, tmp_path: Path) -> None:
    events = pl.read_parquet(trained["events"])
    full = tmp_path / "full"
    job(trained, full, "top_k=5", "max_len=1000")
    job(trained, tmp_path / "s", "mode=stream", "top_k=5")
    np.testing.assert_allclose(
        read(tmp_path / "s")["score"].to_numpy(), read(full)["score"].to_numpy(), rtol=1e-3, atol=1e-4
    )
    assert read(tmp_path / "s")["item_id"].to_list() == read(full)["item_id"].to_list()

    half = len(events) // 2
    events.head(half).write_parquet(tmp_path / "first.parquet")
    events.tail(len(events) - half).write_parquet(tmp_path / "rest.parquet")
    state = tmp_path / "state.parquet"
    job(trained, tmp_path / "h1", "mode=stream", f"input={tmp_path / 'first.parquet'}", f"state_out={state}")
    job(
        trained,
        tmp_path / "h2",
        "mode=stream",
        f"input={tmp_path / 'rest.parquet'}",
        f"state_in={state}",
        "top_k=5",
    )
    np.testing.assert_allclose(
        read(tmp_path / "h2")["score"].to_numpy(), read(full)["score"].to_numpy(), rtol=1e-3, atol=1e-4
    )


def test_stored_states_score_without_deserialising_and_old_state_files_load(
    trained, tmp_path: Path, monkeypatch
) -> None:
    """A user without new events is ranked from the stored last output alone (the state bytes are never
    read), and a state file of an earlier version (torch.save blobs, no hidden column) still continues."""
    import io

    from recsys_mamba.models.base import SequenceEncoder

    events = pl.read_parquet(trained["events"])
    state = tmp_path / "state.parquet"
    job(trained, tmp_path / "a", "mode=stream", "top_k=5", f"state_out={state}")
    first = read(tmp_path / "a")
    assert pl.read_parquet(state)["hidden"].dtype == pl.Array(pl.Float32, 16)

    events.head(0).write_parquet(tmp_path / "none.parquet")

    def refuse(*args, **kwargs):
        raise AssertionError("a stored state was deserialised to score a user without new events")

    with monkeypatch.context() as m:
        m.setattr(SequenceEncoder, "load_state", staticmethod(refuse))
        job(trained, tmp_path / "b", "mode=stream", f"input={tmp_path / 'none.parquet'}",
            f"state_in={state}", "top_k=5", f"state_out={tmp_path / 'again.parquet'}")
    assert read(tmp_path / "b").equals(first)
    assert pl.read_parquet(tmp_path / "again.parquet").equals(pl.read_parquet(state))  # saved unchanged

    def torch_blob(blob: bytes) -> bytes:
        buffer = io.BytesIO()
        torch.save(SequenceEncoder.load_state(blob), buffer)
        return buffer.getvalue()

    old = pl.read_parquet(state).drop("hidden")
    old = old.with_columns(pl.Series("state", [torch_blob(b) for b in old["state"]]))
    old.write_parquet(tmp_path / "old.parquet")
    job(trained, tmp_path / "c", "mode=stream", f"input={tmp_path / 'none.parquet'}",
        f"state_in={tmp_path / 'old.parquet'}", "top_k=5")
    np.testing.assert_allclose(read(tmp_path / "c")["score"].to_numpy(), first["score"].to_numpy(), rtol=1e-6)
    assert read(tmp_path / "c")["item_id"].to_list() == first["item_id"].to_list()


def test_checkpoint_of_another_data_set(trained, tmp_path: Path) -> None:
    from recsys_mamba.data import prepare

    data = compose("prepare", overrides=["data.synthetic.n_items=33", "data.synthetic.n_users=20"])
    other = prepare(data.data, cache_dir=trained["cache"])
    with pytest.raises(RecsysError, match="another data set"):
        job(trained, tmp_path, f"prepared={other}")


def test_item_attributes_are_trained_saved_and_scored(trained_attributes, tmp_path: Path) -> None:
    from recsys_mamba.data import load_item_attributes, load_manifest

    manifest = load_manifest(trained_attributes["prepared"])
    info = manifest["item_attributes"]
    assert manifest["n_attributes"] == 4 and info["items_with_attributes"] == manifest["n_items"]
    assert info["unknown_items"] == 1000 - manifest["n_items"]  # the file's ids without events: counted
    table = torch.from_numpy(load_item_attributes(trained_attributes["prepared"]))
    state = torch.load(trained_attributes["ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(state["encoder.item_attributes"], table)
    # The tied item vectors, by hand from the saved weights: own embedding + mean of its attributes.
    attr = state["encoder.attribute_emb.weight"]
    counts = (table > 0).sum(1, keepdim=True).clamp(min=1)
    attribute_sum = attr[table].masked_fill(table[..., None] == 0, 0).sum(1)
    vectors = state["encoder.item_emb.weight"] + attribute_sum / counts
    model = load_run(trained_attributes["ckpt"])
    assert torch.allclose(model.model.encoder.item_vectors(), vectors, atol=1e-6)
    job(trained_attributes, tmp_path / "t", "top_k=10", "exclude_seen=false")
    out = read(tmp_path / "t")
    user = out["user_id"][0]
    seq = user_sequence(trained_attributes, user)
    batch = {k: torch.tensor([seq[k][0].to_list()[-20:]]) for k in ("items", "categories", "event_types")}
    with torch.no_grad():
        hidden = model.model.encoder.encode(batch)[0, -1]
    # the attribute prior: a learned weight on log(1 + attributes each item shares with the last one)
    weight = state["head.attribute_weight"]
    assert weight != 0 and not any(k.startswith("head.shared_attributes") for k in state)
    last = seq["items"][0].to_list()[-1]
    held = [set(row.tolist()) - {0} for row in table]
    shared = torch.tensor([float(len(held[last] & held[c])) * (c != last) for c in range(len(held))])
    expected = hidden @ vectors[1:].t() + weight * shared[1:].log1p()
    rows = out.filter(pl.col("user_id") == user)
    idx = [model.data.items.index[i] - 1 for i in rows["item_id"]]
    np.testing.assert_allclose(rows["score"].to_numpy(), expected[idx].numpy(), rtol=1e-4, atol=1e-5)
    assert rows["score"][0] == pytest.approx(float(expected.max()), rel=1e-4)
    # an exported bundle rebuilds the shared-attribute table from the attributes it carries
    from recsys_mamba.export import export

    bundle = tmp_path / "bundle"
    export(compose("export", overrides=[f"ckpt_path={trained_attributes['ckpt']}", f"out_dir={bundle}"]))
    job({**trained_attributes, "ckpt": bundle}, tmp_path / "b", "top_k=10", "exclude_seen=false")
    from_bundle = read(tmp_path / "b").filter(pl.col("user_id") == user)
    assert from_bundle["item_id"].to_list() == rows["item_id"].to_list()
    got, want = from_bundle["score"].to_numpy(), rows["score"].to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_user_embeddings_score_as_in_training(trained_ctr_users, tmp_path: Path) -> None:
    state = torch.load(trained_ctr_users["ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    model = load_run(trained_ctr_users["ckpt"])
    assert model.model.head.n_users == state["head.user_emb.weight"].shape[0] - 1 > 0
    events = pl.read_parquet(trained_ctr_users["events"])
    users = events["user_id"].unique().sort().head(3).to_list()
    items = events["item_id"].unique().sort().head(2).to_list()
    pairs = pl.DataFrame(
        {"user_id": [u for u in [*users, "new"] for _ in items], "item_id": items * (len(users) + 1)}
    )
    pairs.write_parquet(tmp_path / "pairs.parquet")
    # "new" has a history but was not a training user: it scores as the unknown user 0.
    history = pl.concat([events, events.head(3).with_columns(user_id=pl.lit("new"))])
    history.write_parquet(tmp_path / "history.parquet")
    job(
        trained_ctr_users,
        tmp_path / "c",
        "mode=candidates",
        f"input={tmp_path / 'pairs.parquet'}",
        f"history={tmp_path / 'history.parquet'}",
    )
    got = pl.concat([pl.read_parquet(f) for f in (tmp_path / "c").glob("*.parquet")]).sort(
        ["user_id", "item_id"]
    )
    # By hand: model=dnn's hidden states are zero, so a score is the head on (user, item) alone.
    user_map = pl.read_parquet(trained_ctr_users["prepared"] / "user_map.parquet")
    index = dict(zip(user_map["user_id"].cast(pl.String), user_map["user_idx"], strict=True))
    idx = torch.tensor([model.data.items.index[i] for i in got["item_id"]])
    user_idx = torch.tensor([index.get(str(u), 0) for u in got["user_id"]])
    head, d = model.model.head, model.model.encoder.d_model
    with torch.no_grad():
        expected = head(
            model.model.encoder,
            torch.zeros(len(idx), 1, d),
            torch.ones(len(idx), 1, dtype=torch.bool),
            idx,
            torch.from_numpy(model.data.items.categories[idx.numpy()]),
            user_idx,
        ).sigmoid()
    assert (user_idx[got["user_id"] == "new"] == 0).all() and (user_idx[got["user_id"] != "new"] > 0).all()
    np.testing.assert_allclose(got["score"].to_numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    # The user matters: the same item scores differently for different known users.
    first = got.filter(pl.col("item_id") == items[0])["score"]
    assert first.n_unique() == len(first)


def test_device_cpu_named_gives_the_default_bytes(trained, tmp_path: Path) -> None:
    default, named = tmp_path / "default", tmp_path / "named"
    job(trained, default)
    job(trained, named, "device=cpu")
    names = sorted(p.name for p in default.iterdir())
    assert names == sorted(p.name for p in named.iterdir())
    assert all((default / n).read_bytes() == (named / n).read_bytes() for n in names)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["device=gpu"], "is not a device: use cpu, cuda or cuda:N"),
        (["device=cuda", "mode=stream"], "mode=stream updates one event at a time"),
        (["device=cuda:1", "engine=ray"], "Ray gives each actor a GPU of its own"),
    ],
)
def test_device_settings_are_checked_before_the_model_loads(trained, tmp_path, overrides, match) -> None:
    with pytest.raises(RecsysError, match=match):
        job(trained, tmp_path / "out", *overrides)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_device_cuda_without_a_gpu_says_so(trained, tmp_path: Path) -> None:
    with pytest.raises(RecsysError, match=r"device=cuda: this machine has no CUDA GPU.*set device=cpu"):
        job(trained, tmp_path / "out", "device=cuda")
    with pytest.raises(RecsysError, match="no CUDA GPU"):
        load_run(trained["ckpt"]).to("cuda:0")


def test_ray_actors_ask_for_a_gpu_only_on_cuda() -> None:
    from recsys_mamba.scoring.ray_job import actor_resources

    assert actor_resources("cpu") == {"num_cpus": 1, "num_gpus": 0}
    assert actor_resources("cuda") == {"num_cpus": 1, "num_gpus": 1}
