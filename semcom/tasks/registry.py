"""Tasks by name. Adding a task: one module under semcom/tasks/ and one line in _BUILTIN.

    from semedge.semcom.tasks.registry import get_task
    get_task("speech").export.inputs        # ("input_features",)

Built-in tasks load when this module is imported (task modules import no torch at the top);
a task from elsewhere (a test, a user plug-in) calls register(task).
"""

from __future__ import annotations

import importlib

from semedge.core.errors import UserError
from semedge.semcom.tasks.base import Task

# name -> "module:attribute" of the Task object: one line per built-in task.
_BUILTIN = {
    "speech": "semedge.semcom.tasks.speech_task:SPEECH",
    "text": "semedge.semcom.tasks.text:TEXT",
    "image": "semedge.semcom.tasks.image:IMAGE",
}

TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add `task` under its name (replacing one of the same name); returns it."""
    if not isinstance(task, Task):
        raise TypeError(f"register() takes a Task, not {type(task).__name__}")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The task registered as `name`; a UserError naming the known tasks otherwise."""
    if name not in TASKS:
        raise UserError(f"task {name!r} is unknown", f"use one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


for _where in _BUILTIN.values():
    _module, _attr = _where.split(":")
    register(getattr(importlib.import_module(_module), _attr))
