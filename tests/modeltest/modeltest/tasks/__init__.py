"""The tasks the harness runs, by the task yaml's task_name."""

from __future__ import annotations

from atb_models import UserError

from modeltest.config import ModelConfig, TaskConfig
from modeltest.tasks.base import Sample, Score, Subset, Task
from modeltest.tasks.textvqa import TextVQA
from modeltest.tasks.videobench import VideoBench

TASKS = {task.name: task for task in (TextVQA, VideoBench)}

__all__ = ["Sample", "Score", "Subset", "Task", "TASKS", "make_task"]


def make_task(config: TaskConfig, model: ModelConfig) -> Task:
    if config.task_name not in TASKS:
        raise UserError(f"task_name {config.task_name!r}: the harness runs {', '.join(TASKS)}")
    return TASKS[config.task_name](config, model)
