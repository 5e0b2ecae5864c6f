"""The terminal: a search's progress as one line per trial event, Ray's start-up settings that
keep library noise out, and no colour codes where output is not a terminal. No Ray starts."""

from __future__ import annotations

import io
import logging
import os
from types import SimpleNamespace

import pytest

from distrib_rda import terminal
from distrib_rda.search.progress import SearchProgress


def trial(trial_id: str, status: str, config=None, result=None, error_file=None):
    return SimpleNamespace(trial_id=trial_id, status=status, config=config or {},
                           last_result=result or {}, error_file=error_file)


def test_search_progress_prints_each_trial_event_once(tmp_path):
    out = io.StringIO()
    progress = SearchProgress(keys=["gamma", "threshold"], metrics=["accuracy", "sparsity"],
                              total=2, search_dir=tmp_path / "space", stream=out)
    config = {"gamma": 0.123456, "threshold": "hard", "unsearched": 1}
    running = [trial("a_0", "RUNNING", config), trial("a_1", "PENDING")]
    assert progress.should_report(running)
    progress.report(running, False)
    assert not progress.should_report(running)  # nothing new: no line, no table
    progress.report(running, False)
    ended = [trial("a_0", "TERMINATED", config, {"epoch": 2, "accuracy": 0.8765,
                                                 "sparsity": 0.95, "train_loss": 0.4}),
             trial("a_1", "ERROR", error_file="/x/error.txt")]
    progress.report(ended, True)
    assert out.getvalue().splitlines() == [
        "trial-a_0 started: gamma 0.1235, threshold hard",
        "trial-a_0 finished after 2 epochs: accuracy 87.65%, sparsity 95.00%  "
        "(gamma 0.1235, threshold hard)  (2 of 2 done, 0 running)",
        "trial-a_1 failed; error log: /x/error.txt  (2 of 2 done, 0 running)",
        f"search stored in {tmp_path / 'space'}",
    ]


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("RAY_DEDUP_LOGS", "RAY_COLOR_PREFIX", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
                 "RAY_AUTH_MODE", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_local_instance_starts_quiet_and_without_colour_codes(clean_env):
    import ray

    terminal.prepare_ray(None)
    assert os.environ["RAY_DEDUP_LOGS"] == "0"
    assert os.environ["RAY_COLOR_PREFIX"] == "0"  # pytest's stderr is no terminal
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert os.environ["RAY_AUTH_MODE"] == "token"  # Ray's own default, said explicitly
    handlers = logging.getLogger("ray").handlers
    assert handlers and all(any(isinstance(f, terminal.StripAnsi) for f in h.filters)
                            for h in handlers)
    assert not ray.is_initialized()


def test_a_cluster_keeps_its_own_settings(clean_env):
    clean_env.setenv("RAY_DEDUP_LOGS", "1")
    terminal.prepare_ray("10.0.0.1:6379")
    assert os.environ["RAY_DEDUP_LOGS"] == "1"  # what the user set stays
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ  # drains happen there
    assert "RAY_AUTH_MODE" not in os.environ  # joining a cluster: Ray decides, without warning


def test_colour_codes_are_stripped_from_log_records():
    record = logging.LogRecord("ray", logging.INFO, __file__, 1,
                               "dashboard at %s%s%s", ("\x1b[1m\x1b[32m", "http://x",
                                                       "\x1b[39m"), None)
    assert terminal.StripAnsi().filter(record)
    assert record.getMessage() == "dashboard at http://x"


def test_mlflow_store_creation_notes_are_off():
    terminal.quiet_mlflow()
    assert not logging.getLogger("mlflow.store.db.utils").isEnabledFor(logging.INFO)
    assert logging.getLogger("mlflow.store.db.utils").isEnabledFor(logging.WARNING)


def test_say_is_one_flushed_line_on_stderr(capsys):
    terminal.say("starting Ray ...")
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "distrib-rda: starting Ray ...\n")

