"""Where the Hydra configs live, our OmegaConf resolvers, and the wrapper every entry point uses."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from recsys_mamba.errors import RecsysError

_PACKAGE_DIR = Path(__file__).resolve().parent


def project_root() -> Path:
    """The source checkout when running from one, else the current working directory."""
    checkout = _PACKAGE_DIR.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "conf").is_dir():
        return checkout
    return Path.cwd()


def config_dir() -> Path:
    """`recsys_mamba/conf` inside an installed wheel, `conf/` in a source checkout."""
    installed = _PACKAGE_DIR / "conf"
    if installed.is_dir():
        return installed
    checkout = _PACKAGE_DIR.parent / "conf"
    if checkout.is_dir():
        return checkout
    raise RecsysError(
        f"no Hydra config folder found at {installed} or {checkout}; reinstall the package "
        "(pip install .) or run from a source checkout"
    )


def register_resolvers() -> None:
    """Idempotently register the `${rs.*:}` resolvers the configs use."""
    if not OmegaConf.has_resolver("rs.project_root"):
        OmegaConf.register_new_resolver("rs.project_root", lambda: str(project_root()))


def hydra_entry(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """`hydra.main` with our config folder, resolvers registered and user errors shown cleanly.

    A `RecsysError` raised by the task prints `error: <message>` on stderr and exits with status 2
    instead of a traceback; any other exception keeps Hydra's behaviour.
    """
    import hydra

    register_resolvers()

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(task)
        def guarded(cfg: DictConfig) -> Any:
            try:
                return task(cfg)
            except RecsysError as err:
                print(f"error: {err}", file=sys.stderr)
                sys.exit(2)

        return hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(guarded)

    return decorate


def compose(
    config_name: str, overrides: list[str] | None = None, return_hydra_config: bool = True
) -> DictConfig:
    """Compose a config outside an entry point (tests, notebooks); `hydra:` interpolations resolve."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = hydra_compose(config_name, overrides=overrides or [], return_hydra_config=return_hydra_config)
    return cfg


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in {"1", "true", "yes"}
