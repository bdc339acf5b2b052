"""`python -m recsys_mamba.bench accuracy runs=[FOLDER,...]`: tables of finished training runs.

Reads every `metrics.json` (with the `config.yaml` beside it) under the given folders, usually the
multirun folders of the `bench_*` experiments, groups runs that differ only in their seed, and writes
the mean and standard deviation of each metric over the seeds (accuracy.json, accuracy.md), beside the
published numbers for the same data and protocol and the goals of the benchmark issue.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from recsys_mamba import checks
from recsys_mamba.bench._harness import write_result
from recsys_mamba.config import hydra_entry
from recsys_mamba.errors import RecsysError
from recsys_mamba.files import write_text_atomic
from recsys_mamba.schema import PathList, PathTo, Rule, Schema
from recsys_mamba.tasks import get_task

RUN_FIELDS = ("epochs", "best_epoch", "train_time_s", "epoch_time_s", "n_params")
# Config keys that say where a run wrote things or which seed it drew, not what was trained.
IGNORED_PREFIXES = (
    "seed",
    "datamodule.seed",
    "module.seed",
    "paths.",
    "hydra.",
    "task_name",
    "name",  # a run's label in reports and trackers
    "optimized_metric",  # what a hyper-parameter search reads, not what is trained
    "ckpt_path",
    "trainer.default_root_dir",
    "trainer.enable_progress_bar",
    "callbacks.progress_bar",
    # Which files hold the latest epoch changes nothing that is tested (the best epoch is)
    "callbacks.last_checkpoint",
    "callbacks.model_checkpoint.save_last",
)

# Leave-one-out, full ranking over all items; ../shared/data/README.md.
PUBLISHED: list[dict[str, Any]] = [
    {
        "data": "ml1m",
        "protocol": "unmasked",
        "model": "Mamba4Rec (paper)",
        "hr@10": 0.3121,
        "ndcg@10": 0.1822,
        "mrr@10": 0.1425,
    },
    {
        "data": "ml1m",
        "protocol": "masked",
        "model": "SASRec, full cross-entropy",
        "hr@10": 0.3152,
        "ndcg@10": 0.1821,
    },
    {"data": "ml1m", "protocol": "masked", "model": "LRURec", "hr@10": 0.3264, "ndcg@10": 0.1930},
    {
        "data": "beauty",
        "protocol": "masked",
        "model": "SASRec, full cross-entropy",
        "hr@10": 0.0533,
        "ndcg@10": 0.0327,
    },
    {"data": "beauty", "protocol": "masked", "model": "LRURec", "hr@10": 0.0528, "ndcg@10": 0.0309},
]
# The benchmark issue's goals: mamba's unmasked NDCG@10 on each data set.
NDCG_GOALS = {"ml1m": 0.20, "beauty": 0.045}


def _flat(node: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        out: dict[str, str] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(node, sort_keys=True)}


def read_run(metrics_file: Path) -> dict[str, Any]:
    """One run: its metrics.json and the flattened config.yaml beside it."""
    try:
        metrics = json.loads(metrics_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RecsysError(
            f"{metrics_file} is not readable JSON ({err}); delete it or re-run that job"
        ) from err
    config_file = metrics_file.with_name("config.yaml")
    if not config_file.is_file():
        raise RecsysError(
            f"{config_file} is missing: {metrics_file} must sit in a run folder written by train"
        )
    config = OmegaConf.to_container(OmegaConf.load(config_file), resolve=False)
    flat = {k: v for k, v in _flat(config).items() if not k.startswith(IGNORED_PREFIXES)}
    seed = config.get("seed") if isinstance(config, dict) else None
    return {"path": str(metrics_file.parent), "metrics": metrics, "config": flat, "seed": seed}


def find_runs(folders: list[str]) -> list[dict[str, Any]]:
    runs = []
    for folder in folders:
        root = Path(folder)
        if not root.is_dir():
            raise RecsysError(
                f"runs: {root} is not a folder; pass the multirun folders, e.g. "
                "runs=[logs/bench_ml1m_next_item/multiruns/<time>]"
            )
        runs += [read_run(f) for f in sorted(root.rglob("metrics.json"))]
    if not runs:
        raise RecsysError(
            f"no metrics.json under {folders}: the runs have not finished (or the paths are wrong)"
        )
    return runs


def _summary(values: list[float]) -> dict[str, Any]:
    real = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not real:
        return {"mean": None, "std": None, "n": 0, "values": values}
    return {
        "mean": statistics.fmean(real),
        "std": statistics.stdev(real) if len(real) > 1 else 0.0,
        "n": len(real),
        "values": values,
    }


def group_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs with equal config (seed aside) form one group; `label` names what sets groups apart."""
    by_key: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        m = run["metrics"]
        key = (m.get("data"), m.get("task"), m.get("model"), json.dumps(run["config"], sort_keys=True))
        by_key[key].append(run)
    groups = []
    for (data, task, model, _), members in by_key.items():
        groups.append({"data": data, "task": task, "model": model, "runs": members})
    # Within one (data, task, model), list the config keys whose values differ between groups.
    families: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for g in groups:
        families[(g["data"], g["task"], g["model"])].append(g)
    for family in families.values():
        configs = [g["runs"][0]["config"] for g in family]
        keys = sorted({k for c in configs for k in c})
        varying = [k for k in keys if len({c.get(k) for c in configs}) > 1]
        for g, c in zip(family, configs, strict=True):
            g["settings"] = {k: json.loads(c[k]) if k in c else None for k in varying}
            g["label"] = g["model"] + "".join(f" {k.rsplit('.', 1)[-1]}={g['settings'][k]}" for k in varying)
    return sorted(groups, key=lambda g: (str(g["data"]), str(g["task"]), g["label"]))


def trained_on_valid(run: dict[str, Any]) -> bool:
    """Whether the run trained on the validation targets: another protocol than the held-out one."""
    return bool(json.loads(run["config"].get("datamodule.train_on_valid", "false")))


def summarise(group: dict[str, Any]) -> dict[str, Any]:
    runs = sorted(group["runs"], key=lambda r: (r["seed"] is None, r["seed"]))
    names = get_task(str(group["task"])).summary_metrics()
    on_valid = trained_on_valid(runs[0])
    label = group["label"]
    if on_valid and "train_on_valid" not in label:
        label += " train_on_valid=True"  # labelled even when no other group differs in it
    return {
        "data": group["data"],
        "task": group["task"],
        "model": group["model"],
        "label": label,
        "train_on_valid": on_valid,
        "settings": group["settings"],
        "mask_history": bool(json.loads(runs[0]["config"].get("head.mask_history", "false"))),
        "seeds": [r["seed"] for r in runs],
        "runs": [r["path"] for r in runs],
        "metrics": {n: _summary([r["metrics"].get(n) for r in runs]) for n in names},
        "run": {f: _summary([r["metrics"].get(f) for r in runs]) for f in RUN_FIELDS},
    }


def _mean(row: dict[str, Any], name: str) -> float | None:
    return row["metrics"].get(name, {}).get("mean")


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals, checked on whatever data sets and models the given runs cover."""
    out: dict[str, Any] = {}
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:  # the default-setting group of each model (the one with no varying keys) or the best
        if row.get("train_on_valid"):
            continue  # published numbers and goals are of the held-out protocol
        key = (str(row["data"]), str(row["model"]))
        metric = get_task(str(row["task"])).selection_metric
        if key not in best or (_mean(row, metric) or -1) > (_mean(best[key], metric) or -1):
            best[key] = row
    for data in sorted({d for d, _ in best}):
        mamba, sasrec = best.get((data, "mamba")), best.get((data, "sasrec"))
        if mamba is None:
            continue
        task = get_task(str(mamba["task"]))
        goal = NDCG_GOALS.get(data)
        if goal is not None:
            m_ndcg = _mean(mamba, "unmasked_ndcg@10")
            out[f"{data}: mamba unmasked NDCG@10 >= {goal}"] = _verdict(m_ndcg, goal, _num(m_ndcg))
        for metric in task.compared_metrics if sasrec is not None else ():
            m, s = _mean(mamba, metric), _mean(sasrec, metric)
            out[f"{data}: mamba {_label(metric)} >= sasrec"] = _verdict(m, s, f"{_num(m)} vs {_num(s)}")
        for row in (r for r in (mamba, sasrec) if r is not None):
            for metric in task.beats_baselines_on:
                for base in task.baseline_names:
                    a, b = _mean(row, metric), _mean(row, f"baseline_{base}_{metric}")
                    out[f"{data}: {row['model']} {_label(metric)} > {base} baseline"] = _verdict(
                        a, b, f"{_num(a)} vs {_num(b)}", strict=True
                    )
    return out


def _label(metric: str) -> str:
    """ndcg@10 -> NDCG@10, unmasked_ndcg@10 -> unmasked NDCG@10, auc -> AUC."""
    protocol, _, name = metric.rpartition("_")
    return f"{protocol} {name.upper()}".strip()


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _verdict(value: float | None, bar: float | None, text: str, strict: bool = False) -> dict[str, Any]:
    if value is None or bar is None:
        return {"met": None, "measured": "n/a"}
    return {"met": bool(value > bar if strict else value >= bar), "measured": text}


def _cell(summary: dict[str, Any]) -> str:
    if summary["mean"] is None:
        return "n/a"
    if summary["n"] > 1:
        return f"{summary['mean']:.4f} ± {summary['std']:.4f}"
    return f"{summary['mean']:.4f}"


def markdown(rows: list[dict[str, Any]], goal_table: dict[str, Any]) -> str:
    lines: list[str] = []
    for data, task_name in sorted({(str(r["data"]), str(r["task"])) for r in rows}):
        part = [r for r in rows if str(r["data"]) == data and str(r["task"]) == task_name]
        task = get_task(task_name)
        mask_history = part[0]["mask_history"]
        cols = task.table_columns(mask_history)
        lines += [
            f"### {data}, {task_name} (mean ± std over seeds)",
            "",
            "| model | seeds | " + " | ".join(cols) + " | epochs | s/epoch |",
            "|---" * (len(cols) + 4) + "|",
        ]
        for r in part:
            epochs = r["run"]["epochs"]["mean"]
            per_epoch = r["run"]["epoch_time_s"]["mean"]
            lines.append(
                f"| {r['label']} | {len(r['seeds'])} | "
                + " | ".join(_cell(r["metrics"][c]) for c in cols)
                + f" | {epochs:.0f} | {per_epoch:.1f} |"
            )
        means = {name: summary for name, summary in part[0]["metrics"].items()}
        for name, cells in task.baseline_rows(means, mask_history):
            shown = ["" if c is None else _cell(c) for c in cells]
            lines.append(f"| {name} | | " + " | ".join(shown) + " | | |")
        for pub in (p for p in PUBLISHED if p["data"] == data):
            names = [_unprefixed(c, pub["protocol"]) for c in cols]
            shown = [f"{pub[m]:.4f}" if m in pub else "" for m in names]
            lines.append(f"| {pub['model']} (published) | | " + " | ".join(shown) + " | | |")
        lines.append("")
    if goal_table:
        lines += ["### Goals", "", "| goal | measured | met |", "|---|---|---|"]
        for name, g in goal_table.items():
            met = {True: "yes", False: "no", None: "n/a"}[g["met"]]
            lines.append(f"| {name} | {g['measured']} | {met} |")
    return "\n".join(lines) + "\n"


def _unprefixed(column: str, protocol: str) -> str:
    """The published metric a column shows: unmasked_ndcg@10 -> ndcg@10 for unmasked numbers."""
    return column.removeprefix(f"{protocol}_") if column.startswith(f"{protocol}_") else ""


def tabulate(folders: list[str]) -> dict[str, Any]:
    rows = [summarise(g) for g in group_runs(find_runs(folders))]
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sources": [str(Path(f).resolve()) for f in folders],
        "groups": rows,
        "goals": goals(rows),
        "published": PUBLISHED,
    }


# conf/bench_accuracy.yaml's values, checked before any run is read.
BENCH_ACCURACY = Schema(
    Rule(
        "runs",
        PathList(
            PathTo("folder", what="the run or multirun folder"),
            required=True,
            example="[logs/bench_ml1m_next_item/multiruns/<time>]",
        ),
    ),
    Rule("output_json", PathTo("out_file")),
)


def validate_config(cfg: DictConfig) -> list[str]:
    """The run folders, once every value is checked."""
    BENCH_ACCURACY.validate(cfg)
    return [str(f) for f in checks.select(cfg, "runs")]


@hydra_entry("bench_accuracy")
def main(cfg: DictConfig) -> dict[str, Any]:
    folders = validate_config(cfg)
    result = tabulate(folders)
    out = write_result(cfg.output_json, result)
    table = markdown(result["groups"], result["goals"])
    write_text_atomic(out.with_suffix(".md"), table)
    print(table)
    print(f"results: {out}")
    return result
