"""Long work the suite starts with the session and checks later: the README's demo and the Slurm runs. One process
starts it (without pytest-xdist, the only one; with it, worker gw0) in threads; each piece writes its result as
JSON under the shared directory (a traceback if it failed), so a test on any worker reads it, waiting for it if
it is not there yet."""

import json
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def shared_root(tmp_path_factory) -> Path:
    """A directory every worker of the session sees (pytest-xdist gives each its own base temp under it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def starts_here() -> bool:
    return os.environ.get("PYTEST_XDIST_WORKER", "gw0") == "gw0"


class Background:
    """Pieces of work by name, each run in a thread writing DIR/name.json: {"result": ...} or {"error": ...}."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.pool = ThreadPoolExecutor(max_workers=12, thread_name_prefix="background")
        self.futures = []

    def start(self, name: str, fn, *args) -> None:
        """Start fn(*args) as piece `name`."""
        self.futures.append(self.pool.submit(self.run, name, fn, *args))

    def run(self, name: str, fn, *args) -> None:
        try:
            outcome = {"result": fn(*args)}
        except BaseException:
            outcome = {"error": traceback.format_exc()}
        temp = self.directory / f".{name}.json.tmp"
        temp.write_text(json.dumps(outcome, default=str))
        temp.rename(self.directory / f"{name}.json")

    def finish(self) -> None:
        """Wait for every piece (a later worker's tests may still read what they leave on disk)."""
        for future in self.futures:
            future.result()
        self.pool.shutdown()


def result(directory: Path, name: str, timeout: float = 1500):
    """The result piece `name` wrote (an AssertionError with its traceback if it failed), waiting up to `timeout`."""
    path, deadline = directory / f"{name}.json", time.monotonic() + timeout
    while not path.is_file():
        assert time.monotonic() < deadline, f"{name}: no result in {timeout:.0f} s ({path})"
        time.sleep(0.5)
    outcome = json.loads(path.read_text())
    assert "error" not in outcome, f"{name} failed:\n{outcome.get('error')}"
    return outcome["result"]
