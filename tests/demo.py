"""The README's demo section as data, and a runner that executes it the way `make demo` does."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def demo_commands() -> list[tuple[str, list[str]]]:
    """(command, the output lines the README shows for it) for each `$ ` line of the README's demo section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## The demo", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```")[1::2]
    commands = []
    for block in blocks:
        for line in block.strip("\n").splitlines():
            if line.startswith("$ "):
                commands.append((line[2:], []))
            elif commands and line.strip():
                commands[-1][1].append(line)
    return commands


def run_demo(work: Path) -> list[str]:
    """Run every README demo command in `work` (holding links to pile_tools/ and configs/); returns each one's
    output, stdout then stderr, as a user reading a terminal would see it."""
    for name in ("pile_tools", "configs"):
        if not (work / name).exists():
            (work / name).symlink_to(ROOT / name)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    outputs = []
    for command, _ in demo_commands():
        args = command.split()
        assert args[0] == ".venv/bin/neox-data", command
        done = subprocess.run(
            [sys.executable, "-m", "cli", *args[1:]], cwd=work, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, f"$ {command}\n{done.stdout}{done.stderr}"
        outputs.append(done.stderr + done.stdout)
    return outputs
