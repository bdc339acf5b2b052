"""Everything that differs between tasks, behind one contract (`tasks.base.Task`): next-click and CTR."""

from __future__ import annotations

from recsys_mamba.errors import RecsysError
from recsys_mamba.tasks.base import DataSettings, HeadInputs, Model, Outputs, Task
from recsys_mamba.tasks.ctr import CTRTask
from recsys_mamba.tasks.next_item import NextItemTask

TASKS: dict[str, Task] = {task.name: task for task in (NextItemTask(), CTRTask())}


def get_task(name: str) -> Task:
    """The task called `name` (`task.name` in the configs)."""
    if name not in TASKS:
        raise RecsysError(f"task.name={name!r} is not one of {tuple(TASKS)}; pick task=next_item or task=ctr")
    return TASKS[name]


__all__ = ["TASKS", "DataSettings", "HeadInputs", "Model", "Outputs", "Task", "get_task"]
