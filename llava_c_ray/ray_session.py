"""Joining Ray: a running cluster when there is one (RAY_ADDRESS, `ray job submit`), else a local Ray."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from llava_c_ray import console

if TYPE_CHECKING:
    from llava_c_ray.config import ClusterConfig

# Ray keeps no more idle worker processes than the machine has CPUs and kills the rest after 1 s.
# On a laptop the training workers alone fill that quota, so every epoch's Ray Data read tasks
# started new Python workers, a 7–12 s stall per epoch under training load. Idle workers are
# kept for a minute instead (a cluster node's quota is its many CPUs; this is for local Ray).
LOCAL_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 60_000}
# Ray Train's controller polls its workers every 2 s, so each stage waits up to that long at
# every state change (start, each worker restart, the end): ~5 s per stage on 2 cores. A local Ray
# polls every 0.5 s (measured: three stage runs 96 s → 80 s); a cluster keeps Ray's default.
LOCAL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def ensure_ray() -> None:
    """Initialise Ray once per process: connect to `RAY_ADDRESS` if set, else start Ray locally.

    `ray job submit` sets RAY_ADDRESS for its entrypoint; `RAY_ADDRESS=auto` joins a cluster
    started on this machine with `ray start`. Without it a Ray of its own is started
    (`start_local_ray`), so two runs on one machine never share (or shut down) each other's.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        start_local_ray()
    route_worker_logs()


def start_local_ray() -> None:
    """Start a local Ray whose processes know its address.

    Ray's own processes look "the" cluster up when they call the State API without an address —
    Ray Train's placement-group cleaner does, every second — first in RAY_ADDRESS, else by
    scanning the machine for GCS processes, which fails with "Found multiple active Ray
    instances" as soon as a second Ray runs here (another `llava-c run`, a `ray start`). So the
    GCS port is chosen up front and RAY_ADDRESS names it in the environment the Ray processes
    inherit when they are spawned; this process's environment is restored afterwards. The API
    server gets a free port too: on the default 8265 a second Ray's calls reached the first
    Ray's server, and the cleaner would have seen its controller as dead.
    """
    import ray
    from ray._private.services import get_node_ip_address

    port = free_port()
    address = f"{get_node_ip_address()}:{port}"
    local = {k: os.environ.get(k, v) for k, v in LOCAL_ENV.items()}  # the user's value wins
    with environment(RAY_ADDRESS=address, RAY_GCS_SERVER_PORT=str(port), **local):
        # The dashboard process is the State API's server, which Ray Train's cleaner polls every
        # second (without it the cleaner logs a warning each time); it listens on localhost only.
        ray.init(
            address="local",
            include_dashboard=True,
            dashboard_port=free_port(),
            _system_config=LOCAL_SYSTEM_CONFIG,
        )


def free_port() -> int:
    """A TCP port nothing listens on now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for the block, then restore the previous values."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def route_worker_logs() -> None:
    """Write what Ray streams from its workers to the run's `logs/workers.log`, and unless the
    console is verbose, not to the console.

    Ray (`log_to_driver`, on by default) streams every worker's and actor's output to the driver
    through one dispatcher, whose default handler ("ray_print_logs") prints it; the log files
    take a handler of their own beside it, and in quiet mode the printing one is removed. Ray
    Data's progress bars are turned off in quiet mode (they would be the bulk of the log)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    from ray.data import DataContext

    dispatcher.remove_handler(WORKER_LOG_HANDLER)
    dispatcher.add_handler(WORKER_LOG_HANDLER, write_worker_lines)
    if not console.LOGS.verbose:
        dispatcher.remove_handler("ray_print_logs")
        DataContext.get_current().enable_progress_bars = False


WORKER_LOG_HANDLER = "llava_c_logs"


def write_worker_lines(batch: dict) -> None:
    """One batch of worker output, each line prefixed as Ray prints it: (actor pid=…, ip=…).
    Of the autoscaler's periodic status only its events are kept, as Ray prints them."""
    from ray._private.worker import filter_autoscaler_events

    lines = batch.get("lines", [])
    if batch.get("pid") == "autoscaler":
        lines = list(filter_autoscaler_events(lines))
    who = batch.get("actor_name") or batch.get("task_name") or ""
    prefix = f"({who} pid={batch.get('pid')}, ip={batch.get('ip')}) ".replace("( ", "(")
    stream = "err" if batch.get("is_err") else "out"
    console.LOGS.write(console.WORKER_LOG, "".join(f"{prefix}[{stream}] {x}\n" for x in lines))


def worker_options(cluster: ClusterConfig) -> dict[str, Any]:
    """`ray.remote` options asking for one training worker's resources (CPUs, GPU, custom
    resources), so that on a cluster a method's task or actor lands where training workers do,
    not on the head."""
    return {
        "num_cpus": cluster.cpus_per_worker,
        "num_gpus": 1 if cluster.use_gpu else 0,
        "resources": dict(cluster.resources_per_worker),
    }
