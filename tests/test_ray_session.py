"""Local Ray: a run's own Ray processes find their cluster while other Ray instances run here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llava_c_ray.ray_session import LOCAL_ENV, environment

# What Ray Train's placement-group cleaner does in its actor: the State API without an address,
# which scans the machine for "the" cluster unless RAY_ADDRESS names it.
PROBE = """
import ray
from llava_c_ray.ray_session import ensure_ray

ensure_ray()

@ray.remote(num_cpus=0)
def lookup():
    import time
    from ray.util.state import list_nodes
    from ray.util.state.exception import RayStateApiException

    for _ in range(60):  # the dashboard's API server may still be starting, as Train's cleaner allows
        try:
            return [node.node_id for node in list_nodes()]
        except RayStateApiException:
            time.sleep(1)
    return "API server never came up"

@ray.remote(num_cpus=0)
def poll_interval():
    import os

    return os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")

own = ray.get_runtime_context().get_node_id()
found = ray.get(lookup.remote())
print("OK" if found == [own] else f"WRONG CLUSTER: {found} != {own}", flush=True)
print(ray.get(poll_interval.remote()), flush=True)
"""


def test_environment_is_restored() -> None:
    os.environ.pop("LLAVA_C_PROBE", None)
    with environment(LLAVA_C_PROBE="1", PATH="x"):
        assert os.environ["LLAVA_C_PROBE"] == "1"
    assert "LLAVA_C_PROBE" not in os.environ and os.environ["PATH"] != "x"


@pytest.mark.integration
def test_two_local_rays_each_find_their_own_cluster() -> None:
    """…and Ray's processes poll Ray Train's workers at the local interval (LOCAL_ENV)."""
    unset = {"RAY_ADDRESS", *LOCAL_ENV}
    env = {k: v for k, v in os.environ.items() if k not in unset}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", PROBE],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for run in runs:
        out, err = run.communicate(timeout=240)
        assert run.returncode == 0, err
        assert out.split() == ["OK", LOCAL_ENV["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]], err
        assert "Found multiple active Ray instances" not in err
