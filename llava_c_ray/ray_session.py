"""Joining Ray: a running cluster when there is one (RAY_ADDRESS, `ray job submit`), else a local Ray."""

from __future__ import annotations

import os


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
        ray.init(address="local", include_dashboard=False)
