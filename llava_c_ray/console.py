"""What a run shows on the console, and where everything else goes.

By default the console carries the run's own lines — a line per finished phase of each stage
(`say`), live progress bars on a terminal, the final tables — and nothing else: library logging
and Python warnings of this process, and the output Ray streams from its workers
(`ray_session.route_worker_logs`), are written to the run directory's `logs/` instead. Nothing is
dropped: lines that arrive before a run directory is known are kept in memory and written when it
is. `-v/--verbose` (`setup(verbose=True)`) leaves every library's console output where it was and
still writes the log files.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from typing import TextIO

LOG_DIR = "logs"
LIBRARY_LOG = "driver.log"
"""Logging and warnings of the driver process (Ray, Ray Data, transformers, …)."""
WORKER_LOG = "workers.log"
"""What Ray's workers and actors printed (training logs, evaluation actors, Ray Data)."""
LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "transformers", "DeepSpeed", "py.warnings")
"""The loggers that print to the console from the driver process."""


class Logs:
    """The log files of the current run: lines are kept in memory until `open_in` names a run
    directory, then appended there (each run of `demo --compare` gets its own)."""

    def __init__(self) -> None:
        self.verbose = True
        self.directory: Path | None = None
        self.pending: dict[str, list[str]] = {}
        self.lock = threading.Lock()

    def write(self, name: str, text: str) -> None:
        with self.lock:
            if self.directory is None:
                self.pending.setdefault(name, []).append(text)
                return
            self.directory.mkdir(parents=True, exist_ok=True)  # moved or removed since
            with open(self.directory / name, "a", encoding="utf-8") as out:
                out.write(text)

    def open_in(self, run_dir: Path) -> Path:
        """Write the logs under `run_dir/logs/` from now on (and what was kept until now)."""
        directory = Path(run_dir) / LOG_DIR
        directory.mkdir(parents=True, exist_ok=True)
        with self.lock:
            self.directory = directory
            pending, self.pending = self.pending, {}
        for name, texts in pending.items():
            self.write(name, "".join(texts))
        return directory


LOGS = Logs()


class LogFileHandler(logging.Handler):
    """A logging handler writing to the run's `driver.log`."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            LOGS.write(LIBRARY_LOG, self.format(record) + "\n")
        except Exception:  # logging must never break the run
            self.handleError(record)


def setup(verbose: bool) -> None:
    """Route this process's library logging and warnings to the run's log files; on the console
    too with `verbose`. Called once by the CLI before any work starts."""
    import ray.data  # noqa: F401  (Ray and Ray Data add their console handlers on import)

    LOGS.verbose = verbose
    logging.captureWarnings(True)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not verbose:
            for handler in [h for h in logger.handlers if is_console(h)]:
                logger.removeHandler(handler)
            logger.propagate = False
        if not any(isinstance(h, LogFileHandler) for h in logger.handlers):
            logger.addHandler(LogFileHandler())
    if not verbose:
        quiet_transformers()


def is_console(handler: logging.Handler) -> bool:
    """A handler printing to the terminal: any stream handler but a file's (Ray's own writes to
    whatever sys.stderr is when it emits)."""
    return isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler
    )


def quiet_transformers() -> None:
    """transformers keeps its own handler and progress bars (weight loading) in this process."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.disable_progress_bar()


def say(text: str, stream: TextIO | None = None) -> None:
    """A line of the run's own output: on the console, and in the driver log."""
    print(text, file=stream or sys.stdout, flush=True)
    LOGS.write(LIBRARY_LOG, text + "\n")
