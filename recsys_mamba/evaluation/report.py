"""`evaluate`: score each checkpoint, bootstrap over users, write metrics.json, report.md, report.html."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from recsys_mamba import checks
from recsys_mamba.errors import RecsysError
from recsys_mamba.evaluation import curves
from recsys_mamba.evaluation.render import Section, html_page, markdown
from recsys_mamba.evaluation.scoring import Scored, score
from recsys_mamba.evaluation.stats import bootstrap, p_text, paired_permutation, percentile_ci, user_draws
from recsys_mamba.files import json_safe, write_texts_atomic
from recsys_mamba.schema import Check, Int, PathList, PathTo, Rule, Schema, Seed
from recsys_mamba.version import git_commit, git_dirty, package_version

log = logging.getLogger(__name__)

LOWER_IS_BETTER = ("logloss", "ece")
MANIFEST_KEYS = ("name", "config_hash", "n_users", "n_items", "n_interactions", "created_at")


def check_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise RecsysError(
            f"out_dir={out_dir} is not writable ({err}); pass a folder you can write to"
        ) from err


def _required(cfg: DictConfig) -> None:
    if checks.select(cfg, "ckpt_path", default=None) in (None, ""):
        raise RecsysError(
            "ckpt_path is required: python -m recsys_mamba.evaluate ckpt_path=<run>/checkpoints/x.ckpt"
        )


_CHECKPOINT = PathTo("exists", what="a .ckpt file from a training run, or an exported bundle folder")

# Every value of conf/evaluate.yaml, checked before any checkpoint is loaded or scored.
EVALUATE = Schema(
    Check(_required),
    Rule("out_dir", PathTo("out_dir")),
    Rule("ckpt_path", _CHECKPOINT),
    Rule("compare", PathList(_CHECKPOINT, example="[a.ckpt,b.ckpt]")),
    Rule("prepared", PathTo("prepared", optional=True)),
    Rule("seed", Seed()),
    Rule("n_bootstrap", Int(1, 10**6, example=200)),
    Rule("n_permutations", Int(1, 10**6, example=1000)),
    Rule("n_bins", Int(1, 10**4, example=10)),
)


def validate_config(cfg: DictConfig) -> None:
    EVALUATE.validate(cfg)


def check_comparable(models: list[Scored]) -> None:
    first = models[0]
    for m in models[1:]:
        if m.task.name != first.task.name:
            raise RecsysError(
                f"{m.ckpt_path} was trained for task={m.task.name} but {first.ckpt_path} for "
                f"task={first.task.name}; compare checkpoints of the same task"
            )
        same_data = m.manifest.get("config_hash") == first.manifest.get("config_hash")
        if not same_data or not np.array_equal(m.arrays["index"], first.arrays["index"]):
            raise RecsysError(
                f"{m.ckpt_path} was trained on another data set ({m.manifest.get('name')}, hash "
                f"{m.manifest.get('config_hash')}) than {first.ckpt_path} ({first.manifest.get('name')}, "
                f"hash {first.manifest.get('config_hash')}); compare checkpoints trained on the same data"
            )


def verdict(models: list[dict[str, Any]], primary: str) -> str:
    base = models[0]
    value, (lo, hi) = base["metrics"][primary], base["ci"][primary]
    lines = [f"{base['name']}: {primary} {value:.4f} (95% CI {lo:.4f} to {hi:.4f})."]
    lower = primary in LOWER_IS_BETTER
    for m in models[1:]:
        test = m["vs_first"][primary]
        diff, p = test["diff"], test["p_value"]
        shown = p_text(p, test["permutations_as_extreme"], test["permutations"])
        how = f"paired permutation test over users, {test['permutations']:,} permutations"
        if not math.isnan(p) and p < 0.05:
            better = (diff < 0) if lower else (diff > 0)
            word = "better" if better else "worse"
            lines.append(
                f"{m['name']} is {word} than {base['name']} on {primary} "
                f"(difference {diff:+.4f}, {shown}, {how})."
            )
        else:
            lines.append(
                f"{m['name']} and {base['name']} do not differ significantly on {primary} "
                f"(difference {diff:+.4f}, {shown}, {how})."
            )
    return " ".join(lines)


def display_names(models: list[Scored]) -> list[str]:
    """Each model's name in tables and legends: the run's `name=` (else its model); runs that share one
    are told apart by their run folders (relative to the folder they have in common)."""
    names = [m.name for m in models]
    folders = [m.run_folder or m.ckpt_path.parent for m in models]
    common = Path(os.path.commonpath([str(f) for f in folders])) if len(folders) > 1 else None
    out = []
    for i, (name, folder) in enumerate(zip(names, folders, strict=True)):
        if names.count(name) == 1:
            out.append(name)
            continue
        where = str(folder.relative_to(common)) if common is not None and folder != common else folder.name
        label = f"{name} ({where})"
        out.append(label if label not in out else f"{label} #{i + 1}")  # the same run given twice
    return out


def full_metrics(m: Scored, n_bins: int) -> dict[str, float]:
    """The training run's test metrics, extended (never recomputed) with the report's extra ones."""
    every = np.arange(len(m.arrays["index"]))
    extended = m.task.report_metrics(m.arrays, n_bins)(every)
    extended.update(m.task.report_extras(m.arrays, m.item_counts))
    return {**extended, **m.metrics}


def summarise(models: list[Scored], n_boot: int, seed: int, n_bins: int, n_perm: int) -> list[dict[str, Any]]:
    draws = user_draws(models[0].arrays["users"], n_boot, seed)
    every = np.arange(len(models[0].arrays["index"]))
    task = models[0].task

    def metrics_of(arrays: dict[str, np.ndarray]) -> dict[str, float]:
        return task.report_metrics(arrays, n_bins)(every)

    out, first_boot = [], None
    for m, name in zip(models, display_names(models), strict=True):
        metrics = full_metrics(m, n_bins)
        boot = bootstrap(m.task.report_metrics(m.arrays, n_bins), draws)
        entry: dict[str, Any] = {
            "name": name,
            "ckpt_path": str(m.ckpt_path),
            "run_folder": str(m.run_folder) if m.run_folder else None,
            "metrics": metrics,
            "ci": {k: percentile_ci(v) for k, v in boot.items()},
        }
        if first_boot is None:
            first_boot = boot
        else:
            base = out[0]["metrics"]
            tests = paired_permutation(
                metrics_of, models[0].arrays, m.arrays, models[0].arrays["users"], n_perm, seed
            )
            entry["vs_first"] = {
                k: {
                    "diff": metrics[k] - base[k],
                    "ci": percentile_ci(v - first_boot[k]),
                    "p_value": tests[k].p_value,
                    "permutations_as_extreme": tests[k].extreme,
                    "permutations": tests[k].n,
                }
                for k, v in boot.items()
            }
        tables = m.task.report_tables(m.arrays, m.item_counts, n_bins)
        if tables:
            entry["buckets"] = tables
        entry["training_metrics"] = m.training_metrics
        entry["curves"] = curves.read(m.run_folder, m.training_metrics) if m.run_folder else []
        out.append(entry)
    return out


def sections(payload: dict[str, Any], images: dict[str, str], config_yaml: str) -> list[Section]:
    models = payload["models"]
    rows = []
    for i, m in enumerate(models):
        for key, value in m["metrics"].items():
            lo, hi = m["ci"].get(key, (None, None))
            test = m.get("vs_first", {}).get(key)
            # "0.034", or "< 0.001" when no permutation was as extreme (p below 1/permutations)
            p = (
                p_text(test["p_value"], test["permutations_as_extreme"], test["permutations"])
                .removeprefix("p = ")
                .removeprefix("p ")
                if test
                else None
            )
            rows.append(
                [m["name"], key, value, lo, hi, test["diff"], p]
                if i and test
                else [m["name"], key, value, lo, hi, None, None]
            )
    out = [
        Section("Verdict", text=payload["verdict"]),
        Section(
            "Models", headers=["model", "checkpoint"], rows=[[m["name"], m["ckpt_path"]] for m in models]
        ),
        Section(
            "Metrics",
            text=f"95% bootstrap confidence intervals over {payload['bootstrap']['n']} resamples of the "
            "test users; difference against the first model, and the two-sided p-value of a paired "
            f"permutation test over users ({payload['permutation_test']['n']:,} permutations: each swaps "
            "the two models' outputs for a random half of the users; '< x' when none of them gave a "
            "difference as large, so p is below 1/permutations).",
            headers=["model", "metric", "value", "CI low", "CI high", "diff vs first", "p-value"],
            rows=rows,
        ),
    ]
    baselines = payload["baselines"]
    if baselines:
        names = list(baselines)
        metrics = [k for k in models[0]["metrics"] if any(k in b for b in baselines.values())]
        out.append(
            Section(
                "Baselines",
                text="Non-sequential baselines on the same test samples, beside every model (from the "
                "first model's training run).",
                headers=["metric", *[m["name"] for m in models], *names],
                rows=[
                    [k, *[m["metrics"].get(k) for m in models], *[baselines[b].get(k) for b in names]]
                    for k in metrics
                ],
            )
        )
    if any(m.get("curves") for m in models):
        monitor = payload["monitor"]
        headers, curve_rows = curves.table([(m["name"], m["curves"]) for m in models], monitor)
        out.append(
            Section(
                "Training curves",
                text="Mean training loss and the monitored validation metric of every epoch, from each "
                "run's metrics.json (or its CSV log).",
                headers=headers,
                rows=curve_rows,
            )
        )
    for m in models:
        for kind, bucket_rows in m.get("buckets", {}).items():
            headers = list(bucket_rows[0]) if bucket_rows else []
            out.append(
                Section(
                    f"{m['name']}: metrics by {kind.replace('_', ' ')}",
                    headers=headers,
                    rows=[list(r.values()) for r in bucket_rows],
                )
            )
    if images:
        out.append(Section("Plots", images=images))
    meta = payload["meta"]
    meta_rows = [[f"data.{k}", v] for k, v in meta["data"].items()]
    meta_rows += [["package_version", meta["package_version"]], ["git_commit", meta["git_commit"] or "n/a"]]
    meta_rows += [
        [f"{m['name']}: seed", (m.get("training_metrics") or {}).get("seed", "n/a")] for m in models
    ]
    meta_rows += [
        [f"{m['name']}: git_commit", (m.get("training_metrics") or {}).get("git_commit") or "n/a"]
        for m in models
    ]
    out.append(Section("Run metadata", headers=["key", "value"], rows=meta_rows))
    out.append(Section("Config of the first model", code=config_yaml))
    return out


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score `cfg.ckpt_path` (and `cfg.compare`) on the test split; write the report to `cfg.out_dir`."""
    validate_config(cfg)
    if not cfg.get("ckpt_path"):
        raise RecsysError(
            "ckpt_path is required: python -m recsys_mamba.evaluate ckpt_path=<run>/checkpoints/x.ckpt"
        )
    out_dir = Path(str(cfg.out_dir))
    check_out_dir(out_dir)
    paths = [Path(str(cfg.ckpt_path)), *(Path(str(p)) for p in cfg.get("compare") or [])]
    for p in paths:
        if not p.is_file():
            raise RecsysError(f"checkpoint {p} does not exist; pass .ckpt files from training runs")
    prepared = cfg.get("prepared")
    models = [score(p, Path(str(prepared)) if prepared else None) for p in paths]
    check_comparable(models)
    n_bins, n_boot, seed = int(cfg.n_bins), int(cfg.n_bootstrap), int(cfg.seed)
    n_perm = int(cfg.get("n_permutations", 1000))
    summary = summarise(models, n_boot, seed, n_bins, n_perm)
    monitor = str(models[0].config.task.monitor)
    primary = monitor.removeprefix("val/")
    manifest = models[0].manifest
    config = OmegaConf.to_container(models[0].config, resolve=False)
    payload = json_safe(
        {
            "task": models[0].task.name,
            "primary_metric": primary,
            "verdict": verdict(summary, primary),
            "bootstrap": {"n": n_boot, "seed": seed, "unit": "user", "level": 0.95},
            "permutation_test": {"n": n_perm, "seed": seed, "unit": "user", "sides": 2},
            "monitor": monitor,
            "baselines": models[0].task.report_baselines(models[0].baselines),
            "models": summary,
            "meta": {
                "data": {k: manifest.get(k) for k in MANIFEST_KEYS}
                | {"split": (manifest.get("split") or {}).get("kind")},
                "package_version": package_version(),
                "git_commit": git_commit(),
                "git_dirty": git_dirty(),
                "config": config,
            },
        }
    )
    title = f"Evaluation report: {payload['task']} on {manifest.get('name', 'data')}"
    named = [(s["name"], m.arrays) for s, m in zip(summary, models, strict=True)]
    images = models[0].task.report_plots(named, [s["metrics"] for s in summary], n_bins)
    images |= curves.plots([(s["name"], s["curves"]) for s in summary], monitor)
    report = sections(payload, images, OmegaConf.to_yaml(config))
    write_texts_atomic(
        {
            out_dir / "metrics.json": json.dumps(payload, indent=2, allow_nan=False) + "\n",
            out_dir / "report.md": markdown(title, report),
            out_dir / "report.html": html_page(title, report),
        },
        hint=f"free disk space or pass a writable out_dir=; the previous report in {out_dir}, if any, "
        "is unchanged",
    )
    log.info("%s\nreport: %s", payload["verdict"], out_dir / "report.html")
    return payload
