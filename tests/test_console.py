"""The console carries the run's own lines; library logging and worker output go to RUN_DIR/logs."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from llava_c_ray import console
from llava_c_ray.ray_session import write_worker_lines


@pytest.fixture
def fresh_logs(monkeypatch):
    """A fresh log state, and the loggers' handlers restored afterwards."""
    import ray.data  # noqa: F401  (its import installs the handlers `setup` replaces)

    logs = console.Logs()
    monkeypatch.setattr(console, "LOGS", logs)
    saved = {
        n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate)
        for n in console.LOGGERS
    }
    yield logs
    for name, (handlers, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.propagate = propagate
    logging.captureWarnings(False)


def test_lines_before_the_run_directory_are_kept_and_written_there(fresh_logs, tmp_path) -> None:
    fresh_logs.write(console.WORKER_LOG, "early\n")
    directory = fresh_logs.open_in(tmp_path / "run")
    fresh_logs.write(console.WORKER_LOG, "late\n")
    assert directory == tmp_path / "run" / "logs"
    assert (directory / console.WORKER_LOG).read_text() == "early\nlate\n"
    other = fresh_logs.open_in(tmp_path / "next")  # the next run of `demo --compare`
    fresh_logs.write(console.WORKER_LOG, "next\n")
    assert (other / console.WORKER_LOG).read_text() == "next\n"


@pytest.mark.parametrize("verbose", [False, True])
def test_library_logs_and_warnings_go_to_the_log_file(
    fresh_logs, tmp_path: Path, capfd, verbose: bool
) -> None:
    console.setup(verbose=verbose)
    fresh_logs.open_in(tmp_path)
    logging.getLogger("ray.data").warning("ray data says")
    logging.getLogger("ray").warning("ray says")
    warnings.warn("a library warning", FutureWarning, stacklevel=1)
    console.say("[1/5 t] scores")
    out, err = capfd.readouterr()
    log = (tmp_path / "logs" / console.LIBRARY_LOG).read_text()
    assert all(
        text in log for text in ("ray data says", "ray says", "a library warning", "[1/5 t]")
    )
    assert out == "[1/5 t] scores\n"
    printing = {
        n: any(map(console.is_console, logging.getLogger(n).handlers)) for n in ("ray", "ray.data")
    }
    assert printing == {"ray": verbose, "ray.data": verbose}
    if not verbose:
        assert "says" not in err and "library warning" not in err


def test_worker_output_is_written_with_its_origin(fresh_logs, tmp_path: Path) -> None:
    fresh_logs.open_in(tmp_path)
    write_worker_lines(
        {
            "pid": 7,
            "ip": "10.0.0.1",
            "actor_name": "RayTrainWorker",
            "is_err": True,
            "lines": ["a", "b"],
        }
    )
    write_worker_lines({"pid": 8, "ip": "10.0.0.2", "is_err": False, "lines": ["c"]})
    assert (tmp_path / "logs" / console.WORKER_LOG).read_text() == (
        "(RayTrainWorker pid=7, ip=10.0.0.1) [err] a\n"
        "(RayTrainWorker pid=7, ip=10.0.0.1) [err] b\n"
        "(pid=8, ip=10.0.0.2) [out] c\n"
    )
