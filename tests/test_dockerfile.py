"""The Dockerfile builds on the official Ray image whose version is the one pyproject.toml pins."""

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def pinned_ray_version() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [re.match(r"ray(\[[^\]]*\])?==([\w.]+)", dep) for dep in project["dependencies"]]
    versions = [pin.group(2) for pin in pins if pin]
    assert len(versions) == 1, project["dependencies"]
    return versions[0]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(instruction, argument) pairs with backslash continuations joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    pairs = [line.split(maxsplit=1) for line in lines if line and not line.startswith("#")]
    return [(pair[0], pair[1] if len(pair) > 1 else "") for pair in pairs]


def test_base_image_is_official_ray_at_pinned_version() -> None:
    froms = [arg for word, arg in dockerfile_instructions() if word == "FROM"]
    assert len(froms) == 1
    match = re.fullmatch(r"rayproject/ray:([\d.]+)-py311-cu\d+", froms[0])
    assert match, froms[0]
    assert match.group(1) == pinned_ray_version()


def test_runs_as_non_root_and_has_no_secrets() -> None:
    users = [arg for word, arg in dockerfile_instructions() if word == "USER"]
    assert users[-1] == "ray"
    text = (ROOT / "Dockerfile").read_text().lower()
    assert not re.search(r"(aws_secret|token=|password|api_key)", text)
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def test_copied_paths_exist_and_flash_attn_is_optional() -> None:
    for word, arg in dockerfile_instructions():
        if word == "COPY":
            for source in arg.split()[1:-1]:
                assert (ROOT / source).exists(), source
    assert "ARG FLASH_ATTN=0" in (ROOT / "Dockerfile").read_text()
