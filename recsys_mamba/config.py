"""Where the Hydra configs live, our OmegaConf resolvers, and the wrapper every entry point uses."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from recsys_mamba import logs
from recsys_mamba.errors import RecsysError

_PACKAGE_DIR = Path(__file__).resolve().parent
log = logging.getLogger("recsys_mamba")


def source_checkout() -> Path | None:
    """The source checkout the package runs from (an editable install), else None (a wheel)."""
    checkout = _PACKAGE_DIR.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "conf").is_dir():
        return checkout
    return None


def project_root() -> Path:
    """The source checkout when running from one, else the current working directory."""
    return source_checkout() or Path.cwd()


def launch_dir() -> Path:
    """The folder the command was started from: runs, caches and outputs go beneath it by default.
    Hydra's record of it when a Hydra app runs (a job with hydra.job.chdir=true has moved since)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.cwd)
    return Path.cwd()


SHARED_DATA = Path("..") / "shared" / "data"  # the real data sets' folder, beside a project's root


def shared_data_dir(root: str | Path) -> Path:
    """`<root>/../shared/data`; when absent there but present beside the source checkout (a command run
    from another folder of an editable install: the checkout's tests, notebooks), that one."""
    here = Path(root) / SHARED_DATA
    checkout = source_checkout()
    if not here.is_dir() and checkout is not None and (checkout / SHARED_DATA).is_dir():
        return checkout / SHARED_DATA
    return here


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
    if not OmegaConf.has_resolver("rs.launch_dir"):
        OmegaConf.register_new_resolver("rs.launch_dir", lambda: str(launch_dir()))
    if not OmegaConf.has_resolver("rs.shared_data_dir"):
        OmegaConf.register_new_resolver("rs.shared_data_dir", lambda root: str(shared_data_dir(root)))
    if not OmegaConf.has_resolver("rs.help"):
        from recsys_mamba import helptext

        # The config folder is passed in: helptext stays below config (no import cycle).
        OmegaConf.register_new_resolver("rs.help", lambda: helptext.hydra_template(config_dir()))
    if not OmegaConf.has_resolver("rs.optuna_direction"):
        OmegaConf.register_new_resolver("rs.optuna_direction", optuna_direction)


# Metrics (by their name without val/ or test/) a search minimises; every other metric is maximised.
LOWER_IS_BETTER = ("logloss", "loss", "ece")


def optuna_direction(metric: str) -> str:
    """Optuna's study direction for `optimized_metric`: minimize a loss, maximize any other metric."""
    name = str(metric).split("/")[-1]
    return "minimize" if name in LOWER_IS_BETTER else "maximize"


def hydra_entry(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """`hydra.main` with our config folder, resolvers registered and user errors shown cleanly.

    Logging is set up once (recsys_mamba/logs.py). A `RecsysError` raised by the task prints
    `error: <message>` on stderr, writes it to the run's log and exits with status 2 instead of a
    traceback; any other exception goes to the run's log with its traceback and then keeps Hydra's
    behaviour (which prints it).
    """
    import hydra

    register_resolvers()

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(task)
        def guarded(cfg: DictConfig) -> Any:
            logs.setup()
            try:
                return task(cfg)
            except RecsysError as err:
                logs.report_error(log, str(err))
                sys.exit(2)
            except KeyboardInterrupt:
                log.error("interrupted (Ctrl-C)", extra={logs.FILE_ONLY: True})
                raise
            except Exception:
                log.exception("the run failed", extra={logs.FILE_ONLY: True})
                raise

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
