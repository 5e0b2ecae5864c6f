"""A search's progress in the terminal: one line per thing that happened to a trial.

Ray Tune's own status table repeats itself every 30 seconds with a clock, its scheduler, a
resource count that reads 0 CPUs (the trials only drive Train controllers) and a log directory
in Ray's session folder. :class:`SearchProgress` prints instead, as it happens:

    trial-67d75_00000 started: target_sparsity 0.8955, gamma 0.1235
    trial-67d75_00000 finished after 2 epochs: accuracy 28.26%, sparsity 89.55%  (target_sparsity
    0.8955, gamma 0.1235)  (1 of 4 done, 1 running)
    trial-67d75_00002 failed; error log: .../error.txt  (2 of 4 done, 1 running)

and, when the search ends, one line saying where it is stored (``--storage``/name). The epochs
of a running trial are the workers' own lines.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ray.tune import ProgressReporter

# Metrics shown for a finished trial, and how.
SHOWN = {"accuracy": "{:.2%}", "sparsity": "{:.2%}"}


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class SearchProgress(ProgressReporter):
    """Prints a line when a trial starts, finishes or fails (module docstring)."""

    def __init__(self, *, keys: list[str], metrics: list[str], total: int, search_dir: Path,
                 stream=None):
        self.keys = keys
        self.metrics = list(dict.fromkeys([*metrics, *SHOWN]))
        self.total = total
        self.search_dir = search_dir
        self.stream = stream or sys.stdout
        self.seen: dict[str, str] = {}

    def should_report(self, trials, done: bool = False) -> bool:
        return done or any(self.seen.get(t.trial_id) != t.status for t in trials)

    def report(self, trials, done: bool, *sys_info: str) -> None:
        for trial in trials:
            if self.seen.get(trial.trial_id) == trial.status:
                continue
            previous = self.seen.get(trial.trial_id)
            self.seen[trial.trial_id] = trial.status
            line = self._line(trial, previous)
            if line:
                finished = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
                running = sum(t.status == "RUNNING" for t in trials)
                if trial.status in ("TERMINATED", "ERROR"):
                    line += f"  ({finished} of {self.total} done, {running} running)"
                print(line, file=self.stream, flush=True)
        if done:
            print(f"search stored in {self.search_dir}", file=self.stream, flush=True)

    def _values(self, trial) -> str:
        """The trial's searched values: ``gamma 0.1235, threshold hard``."""
        config = trial.config or {}
        return ", ".join(f"{key} {_value(config[key])}" for key in self.keys if key in config)

    def _line(self, trial, previous: str | None) -> str | None:
        name = f"trial-{trial.trial_id}"
        if trial.status == "RUNNING" and previous != "RUNNING":
            started = "started" if previous in (None, "PENDING") else "resumed"
            return f"{name} {started}: {self._values(trial)}"
        if trial.status == "TERMINATED":
            result = trial.last_result or {}
            shown = ", ".join(
                f"{metric} {SHOWN.get(metric, '{:.4g}').format(result[metric])}"
                for metric in self.metrics if isinstance(result.get(metric), (int, float)))
            epochs = result.get("epoch")
            after = f" after {epochs} epochs" if epochs is not None else ""
            return f"{name} finished{after}: {shown or 'no result'}  ({self._values(trial)})"
        if trial.status == "ERROR":
            where = f"; error log: {trial.error_file}" if trial.error_file else ""
            return f"{name} failed{where}"
        return None
