"""The written report: files, HTML structure, and numbers that agree with metrics.json and training."""

from __future__ import annotations

import base64
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest

from recsys_mamba.config import compose
from recsys_mamba.errors import RecsysError
from recsys_mamba.evaluation import evaluate
from recsys_mamba.evaluation.render import fmt
from recsys_mamba.tasks import get_task
from recsys_mamba.tasks.next_item import REPORT_KS as KS


class Page(HTMLParser):
    """Headings, tables (as rows of cell texts) and image sources of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[tuple[str, str]] = []
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self._tag: str | None = None
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag == "img":
            self.images.append(a.get("src") or "")
        elif tag in ("link", "script") or (tag == "a" and a.get("href")):
            self.links.append(tag)
        if tag in ("h1", "h2", "td", "th"):
            self._tag, self._text = tag, ""

    def handle_data(self, data: str) -> None:
        if self._tag:
            self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag != self._tag:
            return
        if tag in ("h1", "h2"):
            self.headings.append((tag, self._text))
        else:
            self.tables[-1][-1].append(self._text)
        self._tag = None


def parse(folder: Path) -> Page:
    page = Page()
    page.feed((folder / "report.html").read_text())
    return page


def metrics_table(page: Page) -> dict[tuple[str, str], list[str]]:
    table = next(t for t in page.tables if t[0][:3] == ["model", "metric", "value"])
    return {(row[0], row[1]): row[2:] for row in table[1:]}


def test_files_written_atomically(reports: dict[str, Path]) -> None:
    for folder in reports.values():
        assert sorted(p.name for p in folder.iterdir()) == ["metrics.json", "report.html", "report.md"]


def test_html_structure(reports: dict[str, Path]) -> None:
    page = parse(reports["ctr"])
    titles = [text for tag, text in page.headings if tag == "h2"]
    assert page.headings[0][0] == "h1"
    for title in ("Verdict", "Models", "Metrics", "Plots", "Run metadata"):
        assert title in titles
    assert any("history length" in t for t in titles) and any("item popularity" in t for t in titles)
    assert len(page.images) == 5  # ROC, precision-recall, reliability diagram; loss and val metric per epoch
    for src in page.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix) :]).startswith(b"\x89PNG")
    assert page.links == []  # nothing to fetch: the page opens offline


def test_numbers_agree_with_metrics_json_and_markdown(reports: dict[str, Path]) -> None:
    for folder in reports.values():
        payload = json.loads((folder / "metrics.json").read_text())
        table = metrics_table(parse(folder))
        markdown = (folder / "report.md").read_text()
        for model in payload["models"]:
            for key, value in model["metrics"].items():
                lo, hi = model["ci"].get(key, (None, None))  # top-K statistics have no interval
                assert table[(model["name"], key)][:3] == [fmt(value), fmt(lo), fmt(hi)]
                row = f"| {model['name']} | {key} | {fmt(value)} | {fmt(lo)} | {fmt(hi)} |"
                assert row in markdown


def test_metrics_equal_the_training_run(reports: dict[str, Path], runs: dict[str, Path]) -> None:
    for task, run in (("ctr", runs["ctr_mamba"]), ("next_item", runs["next_item"])):
        trained = json.loads((run.parent.parent / "metrics.json").read_text())
        evaluated = json.loads((reports[task] / "metrics.json").read_text())["models"][0]["metrics"]
        for key in get_task(task).metric_names:
            assert evaluated[key] == pytest.approx(trained[key], abs=1e-12), key


def test_ctr_report_contents(reports: dict[str, Path]) -> None:
    payload = json.loads((reports["ctr"] / "metrics.json").read_text())
    first, second = payload["models"]
    assert set(first["metrics"]) == {"auc", "gauc", "logloss", "ece"}
    assert "vs_first" not in first
    assert 0.0 <= second["vs_first"]["auc"]["p_value"] <= 1.0
    assert second["vs_first"]["auc"]["diff"] == pytest.approx(
        second["metrics"]["auc"] - first["metrics"]["auc"]
    )
    assert sum(b["n"] for b in first["buckets"]["history_length"]) == sum(
        b["n"] for b in first["buckets"]["item_popularity"]
    )
    assert payload["verdict"] and first["name"] in payload["verdict"]
    meta = payload["meta"]
    assert meta["data"]["name"] == "synthetic" and meta["package_version"]
    assert "model" in meta["config"]


def test_next_item_report_contents(reports: dict[str, Path]) -> None:
    metrics = json.loads((reports["next_item"] / "metrics.json").read_text())["models"][0]["metrics"]
    for k in KS:
        for name in ("hr", "ndcg", "mrr", "coverage", "pop_bias"):
            value = metrics[f"{name}@{k}"]
            assert value is not None and math.isfinite(value)
        assert 0.0 < metrics[f"coverage@{k}"] <= 1.0
    assert metrics["hr@1"] <= metrics["hr@5"] <= metrics["hr@10"] <= metrics["hr@20"]


def test_compare_with_other_data_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    cfg = compose(
        "evaluate",
        overrides=[f"ckpt_path={runs['ctr_mamba']}", f"compare=[{runs['ctr_other']}]", f"out_dir={tmp_path}"],
    )
    with pytest.raises(RecsysError, match="another data set"):
        evaluate(cfg)


def test_unknown_checkpoint_is_refused(tmp_path: Path) -> None:
    cfg = compose("evaluate", overrides=[f"ckpt_path={tmp_path / 'nope.ckpt'}", f"out_dir={tmp_path}"])
    with pytest.raises(RecsysError, match="does not exist"):
        evaluate(cfg)


def _table(page: Page, first_header: str) -> list[list[str]]:
    return next(t for t in page.tables if t and t[0] and t[0][0] == first_header)


def test_baselines_are_shown_beside_the_models(reports: dict[str, Path], runs: dict[str, Path]) -> None:
    trained = json.loads((runs["ctr_mamba"].parent.parent / "metrics.json").read_text())
    payload = json.loads((reports["ctr"] / "metrics.json").read_text())
    page = parse(reports["ctr"])
    header, *rows = next(t for t in page.tables if t[0][:1] == ["metric"] and len(t[0]) > 3)
    names = [m["name"] for m in payload["models"]]
    assert header[: 1 + len(names)] == ["metric", *names]
    assert [h.split(":")[0] for h in header[1 + len(names) :]] == ["popularity", "bias"]
    by_metric = {row[0]: row for row in rows}
    for metric, baseline in (("auc", "popularity"), ("auc", "bias"), ("gauc", "bias"), ("logloss", "bias")):
        column = next(i for i, h in enumerate(header) if h.startswith(f"{baseline}:"))
        assert by_metric[metric][column] == fmt(trained[f"baseline_{baseline}_{metric}"])
    markdown = (reports["ctr"] / "report.md").read_text()
    assert "## Baselines" in markdown and fmt(trained["baseline_bias_logloss"]) in markdown
    next_item = parse(reports["next_item"])
    header, *_ = next(t for t in next_item.tables if t[0][:1] == ["metric"] and len(t[0]) > 2)
    assert header[-1].startswith("popularity:")


def test_runs_are_named_by_name_key_else_by_run_folder(reports: dict[str, Path]) -> None:
    named = [m["name"] for m in json.loads((reports["ctr"] / "metrics.json").read_text())["models"]]
    assert named == ["mamba", "attention"]  # the second run was trained with name=attention
    same = json.loads((reports["ctr_same_encoder"] / "metrics.json").read_text())
    assert [m["name"] for m in same["models"]] == ["mamba (ctr_mamba)", "mamba (ctr_mamba_seed7)"]
    models = _table(parse(reports["ctr_same_encoder"]), "model")
    assert [row[0] for row in models[1:]] == ["mamba (ctr_mamba)", "mamba (ctr_mamba_seed7)"]
    assert "mamba (ctr_mamba_seed7)" in same["verdict"]


def test_training_curves_come_from_each_run(reports: dict[str, Path], runs: dict[str, Path]) -> None:
    payload = json.loads((reports["ctr_same_encoder"] / "metrics.json").read_text())
    for model, run in zip(payload["models"], (runs["ctr_mamba"], runs["ctr_mamba_seed7"]), strict=True):
        history = json.loads((run.parent.parent / "metrics.json").read_text())["epoch_history"]
        assert model["curves"] == history and history
        assert {"epoch", "train/loss", "val/auc"} <= set(history[0])
    page = parse(reports["ctr_same_encoder"])
    curves = next(t for t in page.tables if t[0] == ["model", "epoch", "train/loss", "val/auc"])
    first = payload["models"][0]["curves"][0]
    assert curves[1] == [payload["models"][0]["name"], "0", fmt(first["train/loss"]), fmt(first["val/auc"])]


def test_p_values_come_from_a_permutation_test(reports: dict[str, Path]) -> None:
    payload = json.loads((reports["ctr"] / "metrics.json").read_text())
    test = payload["models"][1]["vs_first"]["auc"]
    assert payload["permutation_test"]["n"] == test["permutations"] == 100
    assert test["p_value"] == pytest.approx((test["permutations_as_extreme"] + 1) / 101)
    assert "permutation test over users" in payload["verdict"]
    cell = metrics_table(parse(reports["ctr"]))[(payload["models"][1]["name"], "auc")][-1]
    assert cell == (f"< {1 / 100:.2g}" if test["permutations_as_extreme"] == 0 else f"{test['p_value']:.3f}")
    assert "p = 0.000" not in (reports["ctr"] / "report.md").read_text()
