"""Job YAMLs ship inside the package: `llava-c jobs`, and a wheel installed outside the repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import yaml

from llava_c_ray.cli import main
from llava_c_ray.packaged_jobs import JOBS_DIR, job_names

ROOT = Path(__file__).resolve().parents[1]


def test_the_checkouts_jobs_dir_is_the_packaged_one() -> None:
    assert (ROOT / "jobs").resolve() == JOBS_DIR
    assert job_names() == sorted(p.stem for p in (ROOT / "jobs").glob("*.yaml"))
    assert "demo" in job_names()


def test_jobs_list_show_copy(tmp_path: Path, capsys) -> None:
    assert main(["jobs", "list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert listed == job_names()

    assert main(["jobs", "show", "smoke"]) == 0
    assert capsys.readouterr().out == (JOBS_DIR / "smoke.yaml").read_text()

    assert main(["jobs", "copy", "demo", str(tmp_path / "new") + "/"]) == 0
    assert main(["jobs", "copy", "demo.yaml", str(tmp_path / "mine.yaml")]) == 0
    for copy in (tmp_path / "new" / "demo.yaml", tmp_path / "mine.yaml"):
        assert copy.read_text() == (JOBS_DIR / "demo.yaml").read_text()
    capsys.readouterr()

    assert main(["jobs", "copy", "demo", str(tmp_path / "mine.yaml")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["jobs", "show", "nope"]) == 2
    assert "demo" in capsys.readouterr().err  # the known names


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin/ of a fresh venv holding only the built wheel; the heavy dependencies come from
    this venv's site-packages through a .pth line (which does not run this venv's editable hook,
    so the repo stays invisible)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy, so the build sees only what a clean checkout would ship
    shutil.copytree(
        ROOT / "llava_c_ray", src / "llava_c_ray", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src], check=True
    )
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "main_venv_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next((tmp / "dist").glob("llava_c_ray-*.whl"))
    subprocess.run(
        [*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], check=True
    )
    return env_dir / "bin"


def llava_c(bin_dir: Path, cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    done = subprocess.run(
        [bin_dir / "llava-c", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_an_installed_wheel_runs_its_packaged_jobs(
    installed: Path, tiny_benchmark: Path, tmp_path: Path
) -> None:
    """Measured at ~9 s (build, venv, install, four commands), so it stays in `make test-fast`."""
    help_text = llava_c(installed, tmp_path, "demo", "--help")
    assert "--compare" in help_text and "--methods" in help_text

    listing = llava_c(installed, tmp_path, "jobs", "list")
    assert f"({installed.parent}/" in listing.splitlines()[0]  # the installed copy, not the repo's
    assert "demo" in listing

    bench = f"benchmark.path={tiny_benchmark}"
    show = ["config", "show", "demo", bench, "--no-check-files", "training.epochs=2"]
    shown = yaml.safe_load(llava_c(installed, tmp_path, *show))
    assert shown["name"] == "demo" and shown["method"]["name"] == "llava_c"
    assert shown["training"]["epochs"] == 2

    llava_c(installed, tmp_path, "jobs", "copy", "demo", "my.yaml")
    show = ["config", "show", "my.yaml", "--no-check-files", bench]
    copied = yaml.safe_load(llava_c(installed, tmp_path, *show))
    packaged = yaml.safe_load((JOBS_DIR / "demo.yaml").read_text())
    assert copied["training"]["epochs"] == packaged["training"]["epochs"]
    assert copied == {**shown, "training": copied["training"]} and copied != shown
