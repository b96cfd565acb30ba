"""One owner per run directory: a lock file (train's `SAVE/.lock`, build-shards' `OUTPUT/.lock` or, for one rank
of several, `OUTPUT/.lock-rank<R>`), created exclusively for the run's whole life.

The file holds {"host", "pid", "started", "create_time"} of its holder. A lock left by a dead process on this host
(SIGKILL, a node reboot, a Slurm timeout) is taken over with a warning; the process's create time tells a reused
pid from the holder. A process on another host cannot be checked from here, so the holder touches its lock every
HEARTBEAT_S: one untouched for STALE_S by the filesystem's clock (its node died; the run was requeued elsewhere)
is taken over with a warning, and a younger one is refused.
"""

import fcntl
import json
import os
import socket
import threading
import time
import warnings
from pathlib import Path

import psutil

from pile_tools.ground import InputError

NAME = ".lock"
HEARTBEAT_S = 10.0  # how often a holder touches its lock file
# A lock untouched this long was left by a process on another host that is gone: 18 heartbeats, as NFS may cache
# a file's times for up to 60 s.
STALE_S = 180.0


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
        self.guard = self.path.with_name(name + ".guard")
        self.what = what or str(self.path.parent)
        self.stop = threading.Event()
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
        with open(self.guard, "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            while not self.try_create():
                holder, age = self.read(), self.age()
                if holder is None or age is None:
                    continue  # removed between our attempt and the read: try again
                if holder.get("host") != self.me["host"]:
                    if age < STALE_S:
                        raise InputError(
                            f"{self.what} is in use by the run of {describe(holder)}, alive {age:.0f} s ago; its lock "
                            f"is taken over once untouched for {STALE_S:.0f} s, or remove {self.path} once that "
                            "run is known to be over"
                        )
                    why = f"left it untouched for {age:.0f} s"
                elif holder_alive(holder):
                    raise InputError(f"{self.what} is in use by another run: {describe(holder)}")
                else:
                    why = "ended without releasing it"
                warnings.warn(
                    f"{self.path}: taking over the lock of a run that {why} ({describe(holder)})", stacklevel=2
                )
                self.path.unlink(missing_ok=True)
        threading.Thread(target=self.beat, daemon=True).start()
        return self

    def beat(self) -> None:
        """Touch the lock every HEARTBEAT_S until released, so other hosts can tell it is held."""
        while not self.stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # removed by hand, or a filesystem's hiccup: the next beat tries again
                pass

    def age(self) -> float | None:
        """Seconds since the lock was last touched, by the filesystem's clock (the guard, touched now, gives it:
        another host's clock may differ from ours); None when there is no lock."""
        os.utime(self.guard)
        try:
            touched = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        return self.guard.stat().st_mtime - touched

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
        self.stop.set()
        if (self.read() or {}).get("pid") == self.me["pid"]:
            self.path.unlink(missing_ok=True)
            self.guard.unlink(missing_ok=True)  # it serialises taking over a dead holder's lock: there is none now
