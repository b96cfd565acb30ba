"""What a user gets from `pip install neox-data` (a wheel, not this checkout): every file the commands read at run
time is in it."""

import os
import shutil
import subprocess
import sys

import pytest
from helpers import NEOX, ROOT

from trainer.checkpoint import save_checkpoint
from trainer.config import load_config
from trainer.model import GPTNeoX

LEFT_OUT = (
    ".git",
    ".venv",
    "demo-output",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "tests",
    "notebooks",
    "benchmarks",
)


@pytest.mark.slow
def test_an_installed_wheel_evaluates_with_its_default_tasks(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*LEFT_OUT))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source], check=True)
    (wheel,) = (tmp_path / "dist").glob("neox_data-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", tmp_path / "site", wheel], check=True)
    config = load_config("configs/tiny.yml", ["num_layers=1", "hidden_size=64"])
    save_checkpoint(GPTNeoX(config.model), config, tmp_path / "model", tokenizer=NEOX)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}  # the wheel's files, not this checkout's
    where = subprocess.run(
        [sys.executable, "-c", "import trainer.evaluate as e; print(e.TASKS)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where == str(tmp_path / "site" / "trainer" / "eval_tasks")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "evaluate",
            tmp_path / "model",
            "--limit",
            "2",
            "--output",
            tmp_path / "eval.json",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "neox_books_wordperplexity" in done.stdout and "neox_books_lastword" in done.stdout
    assert (tmp_path / "eval.json").is_file()
