"""The README's demo, command by command, against what the commands really print (timings masked)."""

import re

import pytest
from demo import ROOT, demo_commands


def normal(line: str) -> str:
    """A line with its timings and speeds masked; everything else must match to the character."""
    line = re.sub(r"[\d,.]+ ?(s|tok/s|MB/s|M/s|docs/s)\b", "<t>", line)
    return " ".join(line.split())


def test_the_readme_demo_is_what_the_demo_prints(demo):
    work, outputs = demo
    assert len(outputs) == len(demo_commands()) >= 7
    for (command, expected), printed in zip(demo_commands(), outputs):
        got = [normal(line) for line in printed.splitlines()]
        position = 0
        for want in expected:
            if want.strip() == "...":
                continue
            try:
                position = got.index(normal(want), position) + 1
            except ValueError:
                pytest.fail(f"README: `$ {command}` shows\n  {want}\nbut the command printed:\n{printed}")


def test_the_makefile_runs_the_readme_demo():
    makefile = " ".join((ROOT / "Makefile").read_text().replace("\\\n", " ").split())
    for command, _ in demo_commands():
        assert " ".join(command.replace(".venv/bin/neox-data", "$(BIN)/neox-data").split()) in makefile, command


def test_the_readme_shows_the_slurm_job_files_as_they_are():
    """Each configs/slurm/ job file, whole and unchanged, in a README code block, and the commands that submit
    them as tests/test_slurm.py submits them."""
    readme = (ROOT / "README.md").read_text()
    blocks = [block.split("\n", 1)[1] for block in readme.split("```")[1::2] if "\n" in block]
    files = sorted((ROOT / "configs" / "slurm").glob("*.sbatch"))
    assert [f.name for f in files] == ["build-shards.sbatch", "merge-shards.sbatch", "train.sbatch"]
    for path in files:
        assert path.read_text() in blocks, f"README does not show {path.name} as it is"
    assert "sbatch --parsable --array=0-15 configs/slurm/build-shards.sbatch" in readme
    assert "sbatch --dependency=afterok:$ranks configs/slurm/merge-shards.sbatch" in readme
