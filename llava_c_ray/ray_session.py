"""Joining Ray: a running cluster when there is one (RAY_ADDRESS, `ray job submit`), else a local Ray."""

from __future__ import annotations

import os

# Ray keeps no more idle worker processes than the machine has CPUs and kills the rest after 1 s.
# On a laptop the training workers alone fill that quota, so every epoch's Ray Data read tasks
# started new Python workers, a 7–12 s stall per epoch under training load. Idle workers are
# kept for a minute instead (a cluster node's quota is its many CPUs; this is for local Ray).
LOCAL_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 60_000}


def ensure_ray() -> None:
    """Initialise Ray once per process: connect to `RAY_ADDRESS` if set, else start Ray locally.

    `ray job submit` sets RAY_ADDRESS for its entrypoint; `RAY_ADDRESS=auto` joins a cluster
    started on this machine with `ray start`. Without it Ray is started fresh (`address="local"`)
    rather than joining whatever `ray start` cluster this machine last recorded.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        # A local run needs no dashboard; it costs start-up time on a laptop.
        ray.init(address="local", include_dashboard=False, _system_config=LOCAL_SYSTEM_CONFIG)
