"""One owner per run directory: a lock file (train's `SAVE/.lock`, build-shards' `OUTPUT/.lock` or, for one rank
of several, `OUTPUT/.lock-rank<R>`), created exclusively for the run's whole life.

The file holds {"host", "pid", "started", "create_time"} of its holder. A lock left by a dead process on this host
(SIGKILL, a node reboot, a Slurm timeout) is taken over with a warning; the process's create time tells a reused
pid from the holder. A lock held on another host cannot be checked from here: the message says how to remove it.
"""

import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path

import psutil

from pile_tools.ground import InputError

NAME = ".lock"


def holder_alive(holder: dict) -> bool:
    """Whether the lock's process still runs on this host (the same pid started at the same time)."""
    try:
        return abs(psutil.Process(int(holder["pid"])).create_time() - float(holder["create_time"])) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, TypeError, ValueError):
        return False


def describe(holder: dict) -> str:
    """The lock's holder in words: pid, host and start time."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {started}"


class RunLock:
    """`with RunLock(directory):` holds `directory`/`name`; a second holder is refused with an InputError naming
    the first. `what` names the locked thing in that message (default: the directory)."""

    def __init__(self, directory: Path, name: str = NAME, what: str | None = None):
        self.path = Path(directory) / name
        self.what = what or str(self.path.parent)
        self.me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "create_time": psutil.Process().create_time(),
        }

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Deciding and taking over happen under an flock of a guard file: two runs that find the same stale
        # lock at the same moment are serialised, so the second sees the first's live lock, not the stale one.
        with open(self.path.with_name(self.path.name + ".guard"), "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            while not self.try_create():
                holder = self.read()
                if holder is None:
                    continue  # removed between our attempt and the read: try again
                if holder.get("host") != self.me["host"]:
                    raise InputError(
                        f"{self.what} is in use by the run of {describe(holder)}; if that run is "
                        f"over (its node died), remove {self.path} and start again"
                    )
                if holder_alive(holder):
                    raise InputError(f"{self.what} is in use by another run: {describe(holder)}")
                warnings.warn(
                    f"{self.path}: taking over the lock of a run that ended without releasing it ({describe(holder)})",
                    stacklevel=2,
                )
                self.path.unlink(missing_ok=True)
        return self

    def try_create(self) -> bool:
        """Create the lock file holding this process's identity; False when it exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
        return True

    def read(self) -> dict | None:
        """The holder recorded in the lock file; None when there is none."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:  # empty or cut short by a crash between create and write: nobody holds it
            return {"host": self.me["host"], "pid": -1}

    def __exit__(self, *exc):
        if (self.read() or {}).get("pid") == self.me["pid"]:
            self.path.unlink(missing_ok=True)
            # the guard only serialises taking over a dead holder's lock, and there is none now
            self.path.with_name(self.path.name + ".guard").unlink(missing_ok=True)
