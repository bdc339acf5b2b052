"""`engine=ray` for the scoring job: the partitions of `scoring.partitions` as the rows of a Ray Dataset,
scored by `map_batches` on an actor pool; each actor loads the model once and runs the same
`score_partition` as `engine=local`, so the parts are byte-identical. The driver writes `_SUCCESS`
from what the actors give back, after every partition is done.

Every actor must see the input, the checkpoint and the output folder: on a cluster, paths on storage
all nodes share. An actor that dies (killed, out of memory, node lost) is restarted and its partition
retried, up to `RAY_RETRIES` times; parts are written atomically, so a retry or a rerun after a killed
job finds only whole parts, keeps them and scores the rest. A partition that still fails is a clear
`RecsysError`, and no `_SUCCESS` is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from recsys_mamba.data.engines import RAY_RETRIES, connect
from recsys_mamba.data.tasks import failpoint
from recsys_mamba.errors import RecsysError
from recsys_mamba.runs import load_run
from recsys_mamba.scoring.partitions import Plan, score_partition


class PartitionScorer:
    """A Ray actor's model, loaded once, scoring one partition per call."""

    def __init__(
        self, plan: Plan, ckpt_path: str, prepared: str | None, max_len: int | None, device: str = "cpu"
    ) -> None:
        self.plan = plan
        # with device=cuda Ray gave this actor a GPU of its own (num_gpus=1): it sees it as cuda
        self.run = load_run(ckpt_path, prepared, max_len).to(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        files, rows = [], []
        for index in batch["partition"].tolist():
            failpoint("score", int(index))  # test hook: a worker that dies here
            for part in score_partition(self.run, self.plan, int(index)):
                files.append(part["file"])
                rows.append(part["rows"])
        return {"file": np.array(files, dtype=object), "rows": np.array(rows, dtype=np.int64)}


def _cause(err: BaseException) -> RecsysError | None:
    """A RecsysError a worker raised (bad input, a full disk), from inside Ray's wrappers."""
    seen: set[int] = set()
    todo: list[Any] = [err]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        if isinstance(e, RecsysError):
            return e
        seen.add(id(e))
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


def actor_resources(device: str) -> dict[str, int]:
    """What each scoring actor asks Ray for: a CPU, and a GPU of its own when it scores on one."""
    return {"num_cpus": 1, "num_gpus": 0 if device == "cpu" else 1}


def score_on_ray(plan: Plan, cfg: DictConfig) -> list[dict[str, Any]]:
    """Score every partition of `plan` on `cfg.workers` Ray actors; every part's rows, in part order."""
    if not plan.partitions:
        return []
    ray, started = connect()
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = bool(cfg.progress)
        count = len(plan.partitions)
        items = ray.data.from_items([{"partition": i} for i in range(count)], override_num_blocks=count)
        scored = items.map_batches(
            PartitionScorer,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(int(cfg.workers), count)),
            fn_constructor_kwargs={
                "plan": plan,
                "ckpt_path": str(Path(cfg.ckpt_path).absolute()),
                "prepared": str(Path(cfg.prepared).absolute()) if cfg.prepared else None,
                "max_len": cfg.max_len,
                "device": str(cfg.device),
            },
            **actor_resources(str(cfg.device)),
            # Ray Data's default restarts a dying actor forever: a worker that always dies would hang the
            # job. (Passed as **ray_remote_args, deprecated in Ray 2.60 with no named parameter yet.)
            max_restarts=RAY_RETRIES,
            max_task_retries=RAY_RETRIES,
        )
        found = scored.take_all()
    except Exception as err:
        cause = _cause(err)
        if cause is not None:
            raise cause from None
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RecsysError(
            f"output={plan.out}: engine=ray: scoring failed ({type(err).__name__}: {first}); a worker "
            f"died {RAY_RETRIES + 1} times or the cluster was lost. Finished parts are whole and kept, no "
            "_SUCCESS was written: rerun the command to score the rest, give the workers more memory, or "
            "use engine=local"
        ) from err
    finally:
        if started:
            ray.shutdown()
    rows = {str(r["file"]): int(r["rows"]) for r in found}  # one entry per part, even if a call ran twice
    return [{"file": name, "rows": rows[name]} for name in sorted(rows)]
