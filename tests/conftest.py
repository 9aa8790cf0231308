"""Shared fixtures: one local Ray instance per test session, GPU skip marker."""

from __future__ import annotations

import os

import pytest
import torch

pytest_plugins = ["tests.fixtures_tiny"]


def pytest_collection_modifyitems(config, items):
    from llava_c_ray.evaluate.lmms_run import lmms_eval_installed

    skips = {
        "gpu": (not torch.cuda.is_available(), "needs a CUDA GPU"),
        "lmms": (not lmms_eval_installed(), "needs lmms-eval: `make test-eval` runs these"),
    }
    for item in items:
        for marker, (skip, reason) in skips.items():
            if skip and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray shared by the whole session; subprocesses join it through RAY_ADDRESS."""
    import ray

    from llava_c_ray.ray_session import LOCAL_ENV, LOCAL_SYSTEM_CONFIG

    for key, value in LOCAL_ENV.items():  # inherited by Ray's processes and the `ray start` nodes
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        # "local": never join a cluster this machine last started with `ray start`.
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            _system_config=LOCAL_SYSTEM_CONFIG,
        )
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield ray
    os.environ.pop("RAY_ADDRESS", None)
    ray.shutdown()
