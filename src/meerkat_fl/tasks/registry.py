"""Task registry: name -> Task. The built-in tasks register themselves when the package is imported."""

from __future__ import annotations

from meerkat_fl.errors import ConfigError
from meerkat_fl.tasks.task import Task

_TASKS: dict[str, Task] = {}


def register(task: Task, *, replace: bool = False) -> Task:
    """Add `task` under `task.name`; ConfigError if the name is taken and `replace` is False."""
    if task.name in _TASKS and not replace:
        raise ConfigError(f"task {task.name!r} is already registered; pass replace=True to override it")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task called `name`; ConfigError listing the known names otherwise."""
    try:
        return _TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}") from None


def list_tasks() -> list[str]:
    """Names of all registered tasks, sorted."""
    return sorted(_TASKS)
