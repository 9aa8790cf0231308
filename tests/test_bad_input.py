"""Bad input, one table per command: every case is refused by `llava-c` with exit code 2 and one
named error with its fix, no traceback, the inputs byte-identical and no output left behind.

Everything runs through `cli.main`; nothing trains and nothing starts Ray (the commands that
would are stubbed to fail the test if they got that far).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from llava_c_ray import ray_session
from llava_c_ray.cli import main
from llava_c_ray.errors import LlavaCError
from llava_c_ray.files import refuse_overlap


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file (content hash), directory and symlink under `roots`."""
    seen: dict[str, str] = {}
    for root in roots:
        paths = [root, *root.rglob("*")] if root.is_dir() else [root]
        for path in paths:
            if path.is_symlink():
                seen[str(path)] = f"link:{path.readlink()}"
            elif path.is_dir():
                seen[str(path)] = "dir"
            elif path.exists():
                seen[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


def assert_refused(argv: list[str], expected: str, roots: list[Path], capsys) -> str:
    """`llava-c ARGV` exits 2 with one error naming `expected` and a fix; `roots` unchanged."""
    before = snapshot(*roots)
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert code == 2, output
    assert "Traceback" not in output
    assert [line.startswith("error: ") for line in captured.err.splitlines()].count(True) == 1
    assert "\nFix: " in captured.err, captured.err
    assert expected in captured.err, captured.err
    assert snapshot(*roots) == before, "inputs changed or output left behind"
    return captured.err


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """No case may get as far as starting Ray."""

    def refuse() -> None:
        raise AssertionError("Ray was started: the input should have been refused before")

    monkeypatch.setattr(ray_session, "ensure_ray", refuse)
    monkeypatch.setattr(ray_session, "start_local_ray", refuse)


# ----------------------------------------------------------------------------- a small data set


def write_png(path: Path, size: tuple[int, int] = (8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(path)


def record(i: int, image: str | None = None) -> dict:
    question = ("<image>\n" if image else "") + f"question {i}?"
    entry = {"id": f"r{i}", "conversations": [{"from": "human", "value": question}]}
    entry["conversations"].append({"from": "gpt", "value": f"answer {i}"})
    return {**entry, "image": image} if image else entry


def write_task(root: Path, name: str, records: int = 4) -> dict:
    """A task of image records (train / test) with its images; returns its job entry."""
    images = root / name / "images"
    for i in range(records):
        write_png(images / f"{i}.png")
    for split in ("train", "test"):
        rows = [record(i, f"{i}.png") for i in range(records)]
        (root / name / f"{split}.json").write_text(json.dumps(rows))
    return {
        "name": name,
        "train": str(root / name / "train.json"),
        "test": str(root / name / "test.json"),
        "image_folder": str(images),
    }


@pytest.fixture
def job_world(tmp_path: Path) -> dict[str, Path]:
    """A job of two tasks plus inquiries over data in tmp_path/data; runs go to tmp_path/runs."""
    data = tmp_path / "data"
    tasks = [write_task(data, "first"), write_task(data, "second")]
    inquiry = data / "inquiry.json"
    inquiry.write_text(
        json.dumps([{"id": "q0", "conversations": [{"from": "human", "value": "hi?"}]}])
    )
    job = {
        "name": "bad-input",
        "model": {"path": str(tmp_path / "no-model")},
        "method": {"name": "finetune"},
        "tasks": tasks,
        "inquiry": {"path": str(inquiry)},
        "training": {"per_device_batch": 1, "global_batch": 2},
        "cluster": {"num_workers": 2},
        "storage": {"path": str(tmp_path / "runs")},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    return {"root": tmp_path, "data": data, "job": tmp_path / "job.yaml"}


# ------------------------------------------------------------------------------- config show


def corrupt_index(bench: Path) -> None:
    (bench / "benchmark.json").write_text("{not json")


def list_index(bench: Path) -> None:
    (bench / "benchmark.json").write_text("[1, 2]")


def setting_not_a_list(bench: Path) -> None:
    (bench / "benchmark.json").write_text(json.dumps({"continual": "icon_count"}))


def task_without_name(bench: Path) -> None:
    (bench / "benchmark.json").write_text(json.dumps({"continual": [{"train": "x.json"}]}))


def task_path_wrong_type(bench: Path) -> None:
    (bench / "benchmark.json").write_text(json.dumps({"continual": [{"name": "a", "train": 3}]}))


CONFIG_CASES: dict[str, tuple[list[str], Callable[[Path], None] | None, str]] = {
    "unknown setting": (["benchmark.setting=foo"], None, "benchmark.setting='foo'"),
    "tasks as a string": (["benchmark.tasks=icon_count"], None, "benchmark.tasks=[icon_count]"),
    "corrupt benchmark.json": ([], corrupt_index, "benchmark.json: not valid JSON"),
    "benchmark.json a list": ([], list_index, "expected a JSON object of settings"),
    "setting not a list": ([], setting_not_a_list, "is not a list of tasks"),
    "task without a name": ([], task_without_name, "is not a list of tasks"),
    "task path of the wrong type": ([], task_path_wrong_type, "wrong type"),
    "override not YAML": (["training.lr=[1"], None, "is not plain YAML"),
    "override with a python tag": (
        ["training.lr=!!python/object/apply:os.system [echo hacked]"],
        None,
        "is not plain YAML",
    ),
    "lr inf": (["training.lr=.inf"], None, "training.lr: Input should be a finite number"),
    "lr nan": (["training.lr=.nan"], None, "training.lr: Input should be a finite number"),
    "alpha nan": (["consolidation.alpha=.nan"], None, "finite"),
    "pixel limit 0": (["data.max_image_pixels=0"], None, "data.max_image_pixels"),
    "on_error unknown": (["data.on_error=ignore"], None, "data.on_error"),
    "override into a value": (["training.lr=1", "training.lr.x=1"], None, "is not a section"),
}


@pytest.mark.parametrize("case", CONFIG_CASES, ids=list(CONFIG_CASES))
def test_config_show_refuses(case: str, tiny_benchmark: Path, tmp_path: Path, capsys) -> None:
    overrides, damage, expected = CONFIG_CASES[case]
    bench = tmp_path / "bench"
    if damage is None:
        bench = tiny_benchmark  # only read
    else:
        bench.mkdir()
        damage(bench)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"benchmark": {"path": str(bench)}}))
    argv = ["config", "show", job, *overrides]
    assert_refused(argv, expected, [tmp_path, tiny_benchmark], capsys)


def test_config_show_refuses_a_directory_and_a_non_mapping(tmp_path: Path, capsys) -> None:
    assert_refused(["config", "show", tmp_path], "is a directory", [tmp_path], capsys)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert_refused(["config", "show", tmp_path / "list.yaml"], "mapping", [tmp_path], capsys)
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    assert_refused(["config", "show", tmp_path / "bad.yaml"], "not valid YAML", [tmp_path], capsys)


def test_finite_floats_and_the_data_section_are_accepted(tiny_benchmark: Path, tmp_path) -> None:
    from llava_c_ray.config import load_job

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"benchmark": {"path": str(tiny_benchmark)}}))
    overrides = ["training.lr=1e-4", "data.max_image_pixels=1000", "data.on_error=skip"]
    loaded = load_job(job, overrides)
    assert loaded.training.lr == 1e-4
    assert (loaded.data.max_image_pixels, loaded.data.on_error) == (1000, "skip")
    names = [t.name for t in load_job(job, ["benchmark.tasks=[icon_count]"]).tasks]
    assert names == ["icon_count"]


# ------------------------------------------------------------------------------ data validate


def nested(path: Path) -> None:
    path.write_text("[" * 100_000 + "]" * 100_000)


def empty(path: Path) -> None:
    path.write_text("[]")


def not_utf8(path: Path) -> None:
    path.write_bytes(b"\xff\xfe[]")


DATA_FILE_CASES = {
    "nested 100k deep": (nested, "nested too deeply"),
    "empty": (empty, "no records"),
    "not UTF-8": (not_utf8, "not UTF-8"),
}


@pytest.mark.parametrize("case", DATA_FILE_CASES, ids=list(DATA_FILE_CASES))
@pytest.mark.parametrize("command", ["validate", "prepare"])
def test_data_commands_refuse_bad_files(case, command, tmp_path: Path, capsys) -> None:
    write, expected = DATA_FILE_CASES[case]
    data = tmp_path / "in" / "data.json"
    data.parent.mkdir()
    write(data)
    argv = ["data", command, data] + (["--out", tmp_path / "out"] if command == "prepare" else [])
    assert_refused(argv, expected, [tmp_path], capsys)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """tmp_path/d holding data.json (two image records) and img/."""
    root = tmp_path / "d"
    for i in range(2):
        write_png(root / "img" / f"{i}.png", (40, 30))
    (root / "data.json").write_text(json.dumps([record(i, f"{i}.png") for i in range(2)]))
    return root


VALIDATE_CASES = {
    "missing file": (lambda d: ["nope.json"], "data file not found"),
    "a directory as the file": (lambda d: [d / "img"], "got a directory"),
    "skipped-out a directory": (
        lambda d: [d / "data.json", "--image-folder", d / "img", "--skipped-out", d / "img"],
        "is a directory",
    ),
}


@pytest.mark.parametrize("case", VALIDATE_CASES, ids=list(VALIDATE_CASES))
def test_data_validate_refuses(case: str, data_dir: Path, capsys, monkeypatch) -> None:
    args, expected = VALIDATE_CASES[case]
    monkeypatch.chdir(data_dir.parent)
    (data_dir / "img" / "1.png").unlink()  # one invalid record: --skipped-out is written
    assert_refused(["data", "validate", *args(data_dir)], expected, [data_dir.parent], capsys)


def test_pixel_limit_option(data_dir: Path, capsys) -> None:
    argv = ["data", "validate", data_dir / "data.json", "--image-folder", data_dir / "img"]
    assert main([str(a) for a in argv + ["--max-image-pixels", "1000"]]) == 1
    out = capsys.readouterr().out
    assert "oversized_image" in out and "--max-image-pixels" in out
    assert main([str(a) for a in argv + ["--max-image-pixels", "1200"]]) == 0


# ------------------------------------------------------------------------------- data prepare


def an_existing_file(d: Path) -> Path:
    (d.parent / "file").write_text("keep me")
    return d.parent / "file"


def a_foreign_folder(d: Path) -> Path:
    (d.parent / "mine").mkdir()
    (d.parent / "mine" / "notes.txt").write_text("keep me")
    return d.parent / "mine"


PREPARE_CASES: dict[str, tuple[Callable[[Path], Path], list[str], str]] = {
    "out is the image folder": (lambda d: d / "img", ["--overwrite"], "overlaps the input"),
    "out holds the inputs": (lambda d: d, ["--overwrite"], "overlaps the input"),
    "out inside the image folder": (lambda d: d / "img" / "x", [], "overlaps the input"),
    "out an existing file": (an_existing_file, ["--overwrite"], "is a file"),
    "overwrite a folder prepare did not write": (
        a_foreign_folder,
        ["--overwrite"],
        "not written by `llava-c data prepare`",
    ),
    "out a non-empty folder": (a_foreign_folder, [], "exists and is not empty"),
    "pixel limit": (lambda d: d.parent / "out", ["--max-image-pixels", "100"], "oversized_image"),
}


@pytest.mark.parametrize("case", PREPARE_CASES, ids=list(PREPARE_CASES))
def test_data_prepare_refuses(case: str, data_dir: Path, capsys) -> None:
    out_for, options, expected = PREPARE_CASES[case]
    out = out_for(data_dir)
    argv = ["data", "prepare", data_dir / "data.json", "--image-folder", data_dir / "img"]
    assert_refused([*argv, "--out", out, *options], expected, [data_dir.parent], capsys)


def test_data_prepare_refuses_when_every_record_is_skipped(data_dir: Path, capsys) -> None:
    for png in (data_dir / "img").iterdir():
        png.unlink()
    argv = ["data", "prepare", data_dir / "data.json", "--image-folder", data_dir / "img"]
    argv += ["--out", data_dir.parent / "out", "--mode", "skip"]
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and "every record was skipped" in err and "Fix:" in err
    assert not (data_dir.parent / "out").exists()


# -------------------------------------------------------------------------------- consolidate


@pytest.fixture
def checkpoints(tiny_checkpoint: Path, tiny_tuned_pair, tmp_path: Path) -> Path:
    """tmp_path/D with copies of the base (base/), the tuned model (tuned/) and adapter (adapter/)."""
    adapter, tuned = tiny_tuned_pair
    root = tmp_path / "D"
    for name, source in (("base", tiny_checkpoint), ("tuned", tuned), ("adapter", adapter)):
        shutil.copytree(source, root / name)
    return root


def poison(directory: Path, weights: str) -> str:
    """Put a NaN into the first float matrix of `weights`; returns its name."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / weights))
    name = next(n for n, t in tensors.items() if t.dim() == 2 and t.is_floating_point())
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(directory / weights), metadata={"format": "pt"})
    return name


def corrupt_adapter_config(d: Path) -> str:
    (d / "adapter" / "adapter_config.json").write_text("{oops")
    return "adapter_config.json: not valid JSON"


def adapter_config_without_r(d: Path) -> str:
    config = json.loads((d / "adapter" / "adapter_config.json").read_text())
    del config["r"]
    (d / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    return "positive numbers `r` and `lora_alpha`"


def corrupt_index_file(d: Path) -> str:
    (d / "tuned" / "model.safetensors.index.json").write_text("[")
    return "corrupt index"


def nan_in_tuned(d: Path) -> str:
    return f"tensor {poison(d / 'tuned', 'model.safetensors')!r} holds 1 non-finite"


def nan_in_adapter(d: Path) -> str:
    return f"tensor {poison(d / 'adapter', 'adapter_model.safetensors')!r} holds 1 non-finite"


def foreign_out(d: Path) -> str:
    (d.parent / "mine").mkdir()
    (d.parent / "mine" / "notes.txt").write_text("keep me")
    return "not written by `llava-c consolidate`"


def file_out(d: Path) -> str:
    (d.parent / "mine").write_text("keep me")
    return "output exists and is a file"


# case: (source flag, --out relative to tmp_path, extra options, damage -> expected message)
CONSOLIDATE_CASES: dict[str, tuple[str, str, list[str], Callable[[Path], str] | str]] = {
    "out holds base and tuned": ("tuned", "D", ["--overwrite"], "overlaps the input"),
    "out is the base": ("tuned", "D/base", ["--overwrite"], "overlaps the input"),
    "out is the tuned model": ("tuned", "D/tuned", ["--overwrite"], "overlaps the input"),
    "out inside the base": ("tuned", "D/base/out", [], "overlaps the input"),
    "out inside the adapter": ("adapter", "D/adapter/out", [], "overlaps the input"),
    "out a file, overwrite": ("tuned", "mine", ["--overwrite"], file_out),
    "overwrite a foreign folder": ("tuned", "mine", ["--overwrite"], foreign_out),
    "alpha out of range": ("tuned", "out", ["--alpha", "1.5"], "outside [0, 1]"),
    "NaN in the tuned model": ("tuned", "out", [], nan_in_tuned),
    "NaN in the adapter": ("adapter", "out", [], nan_in_adapter),
    "corrupt adapter_config.json": ("adapter", "out", [], corrupt_adapter_config),
    "adapter_config.json without r": ("adapter", "out", [], adapter_config_without_r),
    "corrupt shard index": ("tuned", "out", [], corrupt_index_file),
}


@pytest.mark.parametrize("case", CONSOLIDATE_CASES, ids=list(CONSOLIDATE_CASES))
def test_consolidate_refuses_before_ray(case: str, checkpoints: Path, capsys) -> None:
    source, out, options, expected = CONSOLIDATE_CASES[case]
    if callable(expected):
        expected = expected(checkpoints)
    argv = ["consolidate", "--base", checkpoints / "base", f"--{source}", checkpoints / source]
    argv += ["--out", checkpoints.parent / out, *options]
    assert_refused(argv, expected, [checkpoints.parent], capsys)


def test_nan_check_reads_only_the_source(checkpoints: Path) -> None:
    """The finiteness check costs one read of the tuned checkpoint (or of the adapter)."""
    import time

    from llava_c_ray.consolidate.engine import Request, plan

    request = Request(checkpoints / "base", checkpoints / "tuned", None, "sac", 0.2, "pad", None)
    started = time.perf_counter()
    assert plan(request)
    assert time.perf_counter() - started < 5


# --------------------------------------------------------------------------- model tiny/compose


TINY_CASES: dict[str, tuple[Callable[[Path, Path], list], str]] = {
    "out a non-empty folder": (lambda b, t: ["--out", b.parent / "other"], "not empty"),
    "out inside the benchmark": (lambda b, t: ["--out", b / "model"], "overlaps the input"),
    "out above the benchmark": (lambda b, t: ["--out", b.parent], "overlaps the input"),
    "out a file": (lambda b, t: ["--out", b.parent / "file"], "is a file"),
    "not a benchmark": (
        lambda b, t: ["--out", t / "new", "--benchmark", b.parent / "other"],
        "no benchmark.json",
    ),
}


@pytest.mark.parametrize("case", TINY_CASES, ids=list(TINY_CASES))
def test_model_tiny_refuses_before_building(case: str, tmp_path: Path, capsys, monkeypatch) -> None:
    import llava_c_ray.model.tiny

    def never(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(llava_c_ray.model.tiny, "build_tiny_llava", never)
    bench = tmp_path / "b" / "benchmark"
    bench.mkdir(parents=True)
    (bench / "benchmark.json").write_text("{}")
    (tmp_path / "b" / "other").mkdir()
    (tmp_path / "b" / "other" / "notes.txt").write_text("keep me")
    (tmp_path / "b" / "file").write_text("keep me")
    args, expected = TINY_CASES[case]
    argv = ["model", "tiny", "--benchmark", bench, *args(bench, tmp_path)]
    assert_refused(argv, expected, [tmp_path], capsys)


def test_model_compose_refuses_an_out_over_its_inputs(tmp_path: Path, capsys) -> None:
    lm, vision, projector = tmp_path / "lm", tmp_path / "clip", tmp_path / "mm_projector.bin"
    for directory, model_type in ((lm, "llama"), (vision, "clip_vision_model")):
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
    projector.write_bytes(b"not read")
    argv = ["model", "compose", "--language-model", lm, "--vision-tower", vision]
    argv += ["--projector", projector, "--overwrite"]
    for out in (tmp_path, lm, vision / "x"):
        assert_refused([*argv, "--out", out], "overlaps the input", [tmp_path], capsys)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert_refused(
        [*argv, "--out", tmp_path / "mine"],
        "not written by `llava-c model compose`",
        [tmp_path],
        capsys,
    )


# -------------------------------------------------------------------------------- run / train


def missing_image_in_second_task(data: Path) -> None:
    rows = json.loads((data / "second" / "train.json").read_text())
    rows[3]["image"] = "missing.png"
    (data / "second" / "train.json").write_text(json.dumps(rows))


def bad_test_record(data: Path) -> None:
    rows = json.loads((data / "first" / "test.json").read_text())
    rows[1]["conversations"] = []
    (data / "first" / "test.json").write_text(json.dumps(rows))


def image_inquiry(data: Path) -> None:
    (data / "inquiry.json").write_text(json.dumps([record(0, "0.png")]))


def every_train_record_bad(data: Path) -> None:
    rows = json.loads((data / "second" / "train.json").read_text())
    (data / "second" / "train.json").write_text(json.dumps([{**r, "image": "x.png"} for r in rows]))


def escaping_image(data: Path) -> None:
    rows = json.loads((data / "second" / "train.json").read_text())
    rows[0]["image"] = "../../first/images/0.png"
    (data / "second" / "train.json").write_text(json.dumps(rows))


RUN_CASES: dict[str, tuple[Callable[[Path], None], list[str], str]] = {
    "missing image in task 2": (
        missing_image_in_second_task,
        [],
        "second train: ",
    ),
    "bad test record": (bad_test_record, [], "first test: "),
    "inquiry with an image": (image_inquiry, [], "inquiry: "),
    "every record skipped": (every_train_record_bad, ["data.on_error=skip"], "nothing is left"),
    "image leaving its folder": (escaping_image, [], "outside_image_folder"),
    "pixel limit": (lambda data: None, ["data.max_image_pixels=10"], "oversized_image"),
}


@pytest.mark.parametrize("case", RUN_CASES, ids=list(RUN_CASES))
def test_run_validates_every_task_before_the_first_stage(
    case: str, job_world: dict[str, Path], capsys, monkeypatch
) -> None:
    import llava_c_ray.pipeline

    def never(*args, **kwargs):
        raise AssertionError("the run went past validation")

    monkeypatch.setattr(llava_c_ray.pipeline, "resolve_initial_model", never)
    monkeypatch.setattr(llava_c_ray.pipeline, "open_run", never)
    damage, overrides, expected = RUN_CASES[case]
    damage(job_world["data"])
    argv = ["run", job_world["job"], *overrides]
    err = assert_refused(argv, expected, [job_world["root"]], capsys)
    if case == "missing image in task 2":
        assert "set data.on_error=skip" in err
    assert not (job_world["root"] / "runs").exists()


def test_train_validates_its_task_first(job_world: dict[str, Path], capsys) -> None:
    missing_image_in_second_task(job_world["data"])
    out = job_world["root"] / "stage"
    argv = ["train", job_world["job"], "--task", "second", "--init", "nowhere", "--out", out]
    err = assert_refused(argv, "second train: ", [job_world["root"]], capsys)
    assert "data.on_error=skip" in err and "mode skip" not in err


def test_skip_writes_the_skipped_ids_and_trains_on_the_rest(job_world: dict[str, Path]) -> None:
    from llava_c_ray.config import load_job
    from llava_c_ray.pipeline import apply_skipped, check_job_data

    missing_image_in_second_task(job_world["data"])
    job = load_job(job_world["job"], ["data.on_error=skip"])
    run_dir = job_world["root"] / "runs" / "r"
    kept = apply_skipped(job, check_job_data(job), run_dir)
    skipped = json.loads((run_dir / "skipped" / "second.json").read_text())
    assert [s["id"] for s in skipped] == ["r3"] and skipped[0]["kind"] == "missing_image"
    assert json.loads((run_dir / "skipped" / "first.json").read_text()) == []
    assert kept.task("first").train == job.task("first").train
    rows = json.loads(kept.task("second").train.read_text())
    assert [r["id"] for r in rows] == ["r0", "r1", "r2"]
    assert job.task("second").train == job_world["data"] / "second" / "train.json"


# --------------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    input_parts=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3),
    cut=st.integers(min_value=0, max_value=3),
    extra=st.lists(st.sampled_from(["x", "y"]), max_size=2),
)
def test_an_out_under_or_above_an_input_is_refused(
    tmp_path_factory, input_parts: list[str], cut: int, extra: list[str]
) -> None:
    """Any --out that is an ancestor of the input (down to the root), the input, or below it."""
    root = tmp_path_factory.getbasetemp() / "overlap"
    source = root.joinpath(*input_parts)
    above = Path(*source.parts[: max(1, len(source.parts) - cut)])
    below = source.joinpath(*extra)
    for out in (above, below):
        with pytest.raises(LlavaCError, match="overlaps the input"):
            refuse_overlap(out, [source], fix="choose another --out")
    refuse_overlap(root / "elsewhere" / "out", [source], fix="choose another --out")
