"""The build's named steps: each one timed, shown on the progress bar and listed in the manifest."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm


class Steps:
    """A visible list of named steps, planned up front so the bar knows its length.

    Parameters
    ----------
    plan : list of str
        The steps' names, in the order they will run.
    show_progress : bool
        Draw a tqdm bar on the terminal.
    """

    def __init__(self, plan: list[str], show_progress: bool = True, desc: str = "build"):
        self.plan = list(plan)
        self.seconds: dict[str, float] = {}
        self._bar = tqdm(total=len(self.plan), desc=desc, unit="step", disable=not show_progress)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time one step of the plan; a name not in the plan is a programming error."""
        if name not in self.plan:
            raise ValueError(f"step {name!r} is not in the plan {self.plan}")
        self._bar.set_postfix_str(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)
        self._bar.update()

    def close(self) -> None:
        self._bar.close()

    def to_manifest(self) -> list[dict[str, float | str]]:
        """The steps that ran, in order, with their seconds."""
        return [{"name": n, "seconds": self.seconds[n]} for n in self.plan if n in self.seconds]
