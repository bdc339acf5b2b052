"""`--help` of every entry point, built from the YAML files it composes, comments included.

Hydra's own help prints the composed config (comments gone) and every config group of the folder, so
`score --help` listed `model` and `trainer`, which only `train` reads. This lists the groups of the
entry point's own defaults list (with the option in use) and the text of each file it composes: its
primary config and the chosen option of each group, the comments that explain every key kept as
written. Overrides on the command line choose what is shown (`train model=sasrec --help`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

INDENT = "  "
_DEFAULTS = re.compile(r"^defaults\s*:")


def _strip_defaults(text: str) -> str:
    """The file without its `defaults:` list (shown as groups instead) and without trailing blank lines."""
    out, skipping = [], False
    for line in text.splitlines():
        if _DEFAULTS.match(line):
            skipping = True
            continue
        if skipping and (line.startswith((" ", "\t", "-")) or not line.strip()):
            continue
        skipping = False
        out.append(line)
    while out and not out[-1].strip():
        out.pop()
    return "\n".join(out)


def _leading_comments(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            lines.append(line.lstrip("# ").rstrip())
    return lines


def _defaults(path: Path) -> list[Any]:
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    return list(loaded.get("defaults") or []) if isinstance(loaded, dict) else []


def _group_files(root: Path, group: str, option: str, seen: set[Path] | None = None) -> list[Path]:
    """The option's file and the files of its own group it pulls in by name (trainer/cpu -> default,
    callbacks/default -> model_checkpoint, ...), each once, in the order they compose."""
    seen = set() if seen is None else seen
    path = root / group / f"{option}.yaml"
    if path in seen or not path.is_file():
        return []
    seen.add(path)
    files = []
    for entry in _defaults(path):
        if isinstance(entry, str) and entry != "_self_" and "/" not in entry:
            files += _group_files(root, group, entry, seen)
    return [*files, path]


def _options(root: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (root / group).glob("*.yaml"))


def _indent(text: str) -> str:
    return "\n".join(INDENT + line if line.strip() else "" for line in text.splitlines())


def entry_help(root: Path, config_name: str, choices: dict[str, Any]) -> str:
    """The help of `python -m recsys_mamba.<entry>` from the config folder `root`: usage, groups, and
    every composed file's keys."""
    primary = root / f"{config_name}.yaml"
    text = primary.read_text()
    groups = [g for g in choices if not g.startswith("hydra") and (root / g).is_dir()]
    command = f"python -m recsys_mamba.{config_name.replace('bench_', 'bench ')}"
    about = _leading_comments(text)
    out = [f"{command}: {about[0]}" if about else command, *[INDENT + line for line in about[1:]], ""]
    out.append(f"Usage: {command} [group=option ...] [key=value ...] [--help] [-m ...]")
    out.append("Every value below is a default; the comments say what each key does.")
    if groups:
        out += ["", "== Config groups (group=option; * marks the option in use) =="]
        for group in groups:
            chosen = choices.get(group)
            marked = [f"{o}*" if o == chosen else o for o in _options(root, group)]
            out.append(f"{INDENT}{group}: {', '.join(marked)}")
    body = "\n".join(text.splitlines()[len(about) + text.count("# @package", 0, 0) :])  # header shown above
    out += ["", f"== {config_name}.yaml (key=value) ==", _indent(_strip_defaults(body))]
    for group in groups:
        chosen = choices.get(group)
        if not chosen:
            continue
        for path in _group_files(root, group, str(chosen)):
            body = _strip_defaults(path.read_text())
            if not body.strip():
                continue
            package = "global keys" if "# @package _global_" in body else f"keys {group}.*"
            rel = path.relative_to(root)
            out += ["", f"== {group}={chosen}: {rel} ({package}) ==", _indent(body)]
    return "\n".join(out) + "\n"


def hydra_template(root: Path) -> str:
    """The `hydra.help.template` of every entry point (conf/hydra/help/recsys.yaml): the text of
    `entry_help` for the config being composed, plus Hydra's flags."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    text = entry_help(root, str(hydra_cfg.job.config_name), dict(hydra_cfg.runtime.choices))
    # The template is filled in by string.Template: a literal $ (e.g. $RAY_ADDRESS in a comment) doubles.
    return text.replace("$", "$$") + "\n== Hydra flags ==\n$FLAGS_HELP"
