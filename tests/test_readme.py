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
