"""Task registry: name -> task (anything implementing TaskProtocol). The built-in tasks register themselves
when the package is imported."""

from __future__ import annotations

from meerkat_fl.errors import ConfigError
from meerkat_fl.tasks.protocol import TaskProtocol

_TASKS: dict[str, TaskProtocol] = {}


def register(task: TaskProtocol, *, replace: bool = False) -> TaskProtocol:
    """Add `task` under `task.name`; ConfigError if the name is taken and `replace` is False."""
    if task.name in _TASKS and not replace:
        raise ConfigError(f"task {task.name!r} is already registered; pass replace=True to override it")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> TaskProtocol:
    """The registered task called `name`, or whose Hugging Face dataset is `name` ("org/name" or
    "org/name:config", e.g. "nyu-mll/glue:sst2"); ConfigError listing the known names otherwise."""
    if name in _TASKS:
        return _TASKS[name]
    if "/" in name:
        return _task_of_hub_dataset(name)
    raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}")


def _task_of_hub_dataset(hub_id: str) -> TaskProtocol:
    from meerkat_fl.tasks.hub import parse_hub_id

    dataset, config = parse_hub_id(hub_id)
    matches = {
        task.name
        for task in _TASKS.values()
        for source in getattr(task, "sources", {}).values()  # tasks read from files or the hub have sources
        if source.hub is not None and source.hub.name == dataset and config in (None, source.hub.config)
    }
    if len(matches) == 1:
        return _TASKS[matches.pop()]
    if matches:
        raise ConfigError(f"{hub_id!r} is the dataset of several tasks ({', '.join(sorted(matches))}); "
                          f"name the config (e.g. {dataset}:<config>) or the task")
    raise ConfigError(
        f"no task reads the Hugging Face dataset {hub_id!r}: a task needs its template and label words. Use a "
        f"known task with task.hub={hub_id} (same columns), or register a Task; known tasks: {', '.join(list_tasks())}"
    )


def list_tasks() -> list[str]:
    """Names of all registered tasks, sorted."""
    return sorted(_TASKS)
