"""The cluster path: a two-node Ray cluster on 127.0.0.1 (`ray start` head + worker, separate
resources), `ray job submit --working-dir . -- llava-c run jobs/smoke.yaml`, and its run directory
— including the α search inside `llava-c run` (the smoke job searches α under a general floor)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def node_ports(ports: list[int]) -> list[str]:
    """Per-node agent ports: two nodes on one machine must not share them."""
    names = (
        "dashboard-agent-listen",
        "dashboard-agent-grpc",
        "runtime-env-agent",
        "metrics-export",
    )
    names += ("node-manager", "object-manager")
    return [f"--{name}-port={port}" for name, port in zip(names, ports, strict=True)]


def cluster_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Token auth (Ray's default for `ray start`) needs the token on every node; a loopback test
    # cluster opts out.
    return env | {"RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{env['PATH']}"}


def start_node(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", *args],
        env=cluster_env(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_node(node: subprocess.Popen) -> None:
    """SIGINT lets `ray start --block` stop its processes; SIGKILL the group if it lingers."""
    os.killpg(node.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGKILL)


NODE_START_BUDGET_S = 600
"""How long `ray start` may take to show a node in `ray status`: ~10 s on an idle machine; on
these 2 cores under a parallel training run it took over 90 s (the wait ends as soon as the node
shows)."""


def wait_for_nodes(
    address: str,
    count: int,
    node: subprocess.Popen,
    log: Path,
    timeout: float = NODE_START_BUDGET_S,
) -> None:
    """Until `ray status` shows `count` nodes; fails at once, with its log, if `node` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if node.poll() is not None:
            raise RuntimeError(
                f"`ray start` exited ({node.returncode}):\n{log.read_text()[-3000:]}"
            )
        out = subprocess.run(
            [str(BIN / "ray"), "status", f"--address={address}"],
            env=cluster_env(),
            capture_output=True,
            text=True,
        ).stdout
        if out.count("node_") >= count and "Pending:" in out:
            return
        time.sleep(2)
    raise TimeoutError(f"the cluster at {address} did not reach {count} nodes:\n{out}")


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("cluster")
    gcs, dashboard, client, *ports = free_ports(15)
    # Short paths (Ray's socket paths have a length limit), one per node: nodes sharing a
    # machine must not share runtime_resources, or one node's cleanup deletes the other's files.
    head_dir, worker_dir = (tempfile.mkdtemp(prefix="rc", dir="/tmp") for _ in range(2))
    head = start_node(
        [
            "--head",
            f"--port={gcs}",
            f"--ray-client-server-port={client}",
            "--num-cpus=2",
            "--include-dashboard=true",
            f"--dashboard-port={dashboard}",
            f"--temp-dir={head_dir}",
            "--disable-usage-stats",
            *node_ports(ports[:6]),
        ],
        logs / "head.log",
    )
    worker = None
    try:
        wait_for_nodes(f"127.0.0.1:{gcs}", 1, head, logs / "head.log")
        worker = start_node(
            [
                f"--address=127.0.0.1:{gcs}",
                "--num-cpus=2",
                f"--temp-dir={worker_dir}",
                *node_ports(ports[6:12]),
            ],
            logs / "worker.log",
        )
        wait_for_nodes(f"127.0.0.1:{gcs}", 2, worker, logs / "worker.log")
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        for node in (worker, head):
            if node is not None:
                stop_node(node)
        for path in (head_dir, worker_dir):
            shutil.rmtree(path, ignore_errors=True)


def test_ray_job_submit_runs_the_smoke_job(
    two_node_cluster, tiny_benchmark, tiny_checkpoint, tmp_path
):
    command = [
        str(BIN / "ray"),
        "job",
        "submit",
        f"--address={two_node_cluster}",
        "--working-dir",
        ".",
        "--",
        "llava-c",
        "run",
        "jobs/smoke.yaml",
        f"model.path={tiny_checkpoint}",
        f"benchmark.path={tiny_benchmark}",
        f"storage.path={tmp_path}",
    ]
    done = None
    for _ in range(5):  # the job agent may need a few seconds after the node registers
        done = subprocess.run(
            command, cwd=REPO, env=cluster_env(), capture_output=True, text=True, timeout=900
        )
        if "No available agent" not in done.stderr:
            break
        time.sleep(5)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "succeeded" in done.stdout
    # The run's console: its own lines, not Ray Tune's trial tables (those stay in the run dir).
    assert "α search in" in done.stdout
    assert "training_iteration" not in done.stdout and "Configuration for" not in done.stdout
    results = json.loads((tmp_path / "smoke" / "results.json").read_text())
    assert results["finished"] and results["tasks"] == ["icon_count", "attributes"]
    assert len(results["accuracy_matrix"]) == 3
    assert_run_uses_the_searched_alpha(tmp_path / "smoke", REPO / "jobs" / "smoke.yaml")


def chosen_by_the_floor_rule(trials: list[dict]) -> float:
    """The α the search must pick (llava_c_ray/search/objective.py, restated): among candidates
    that keep the probe floor the highest objective, else the highest probe score; ties to the
    smaller α."""
    kept = [t for t in trials if t["keeps_floor"]]
    key = "objective" if kept else "general"
    best = max(t[key] for t in kept or trials)
    return min(t["alpha"] for t in kept or trials if t[key] == best)


def assert_run_uses_the_searched_alpha(run: Path, job_file: Path) -> None:
    """Every consolidating stage searched the job's whole grid and consolidated with its choice."""
    search_config = yaml.safe_load(job_file.read_text())["search"]
    manifest = json.loads((run / "manifest.json").read_text())
    for stage in manifest["stages"][1:]:
        search, consolidate = stage["steps"]["search"], stage["steps"]["consolidate"]
        saved = json.loads(
            (
                run / "stages" / f"{stage['index']:02d}-{stage['name']}" / "search" / "trials.json"
            ).read_text()
        )
        assert saved["trials"] == search["trials"] and saved["best_alpha"] == search["alpha"]
        assert sorted(t["alpha"] for t in search["trials"]) == search_config["space"]
        threshold = saved["general_threshold"]
        assert threshold == pytest.approx(
            search_config["general_floor"] * saved["general_reference"]
        )
        for trial in search["trials"]:
            assert trial["keeps_floor"] == (trial["general"] >= threshold - 1e-9), trial
        assert search["alpha"] == chosen_by_the_floor_rule(search["trials"])
        assert consolidate["alpha"] == stage["alpha"] == search["alpha"]
        assert Path(search["experiment"]).is_dir()
        assert (run / "plots" / f"alpha_{stage['name']}.png").stat().st_size > 0
    first, second = manifest["stages"][1:]
    assert all(t["old"] is None for t in first["steps"]["search"]["trials"])
    assert all(t["old"] is not None for t in second["steps"]["search"]["trials"])
