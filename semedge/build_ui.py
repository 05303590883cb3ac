"""Progress for `semedge build`: a rich progress bar and log lines (also appended to out/build.log)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path


class UI:
    """Rich progress bar + log lines (log also appended to out/build.log)."""

    def __init__(self, out: Path, progress: bool):
        self.out = out
        self.progress = None
        self.console = None
        if progress:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.console = Console(stderr=True)
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=self.console, transient=False)
        self.task = None

    def __enter__(self):
        if self.progress:
            self.progress.start()
            self.task = self.progress.add_task("build", total=6)
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        with open(self.out / "build.log", "a", encoding="utf-8") as f:
            f.write(line + "\n")
        if self.console:
            self.console.log(msg)

    def stage(self, name: str) -> None:
        if self.progress:
            self.progress.update(self.task, description=f"build: {name}")

    def advance(self) -> None:
        if self.progress:
            self.progress.advance(self.task)

    @contextmanager
    def sub(self, desc: str, total: int):
        if not self.progress:
            yield lambda: None
            return
        t = self.progress.add_task(f"  {desc}", total=total)
        try:
            yield lambda: self.progress.advance(t)
        finally:
            self.progress.remove_task(t)
