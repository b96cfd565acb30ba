"""One owner per run directory: a lock file (train's `SAVE/.lock`, build-shards' `OUTPUT/.lock` or, for one rank
of several, `OUTPUT/.lock-rank<R>`), created exclusively for the run's whole life.

The file holds {"host", "pid", "started", "create_time", "pid_ns"} of its holder. A lock left by a dead process of
this host and PID namespace (SIGKILL, a node reboot, a Slurm timeout) is taken over with a warning; the process's
create time tells a reused pid from the holder. A process on another host, or in another PID namespace of this one
(a container sharing the host's network and name), cannot be checked from here, so the holder touches its lock
every HEARTBEAT_S: one untouched for STALE_S by the filesystem's clock (its node died; the run was requeued
elsewhere) is taken over with a warning, and a younger one is refused. A lock file that is not one this module
wrote is refused in one line saying what to do. Locks of one directory that exclude each other (a whole
build-shards run and a rank of one) are each checked by the other's taker, after it holds its own: of two that
start at once, at most one goes on.
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
from pydantic import Field

from pile_tools.ground import InputError
from pile_tools.readback import Record, check_shape

NAME = ".lock"
HEARTBEAT_S = 10.0  # how often a holder touches its lock file
# A lock untouched this long was left by a process on another host that is gone: 18 heartbeats, as NFS may cache
# a file's times for up to 60 s.
STALE_S = 180.0


class Holder(Record):
    host: str
    pid: int
    started: float = Field(default=0.0, strict=False)
    create_time: float = Field(strict=False)
    pid_ns: str | None = None


def pid_namespace() -> str | None:
    """This process's PID namespace ('pid:[4026531836]'): processes of one host see each other's pids only
    within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


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


class Held(InputError):
    """The lock, or one it excludes, is held by a run that may be alive."""


class RunLock:
    """`with RunLock(directory):` holds `directory`/`name`; a second holder is refused with an InputError naming
    the first. `what` names the locked thing in that message (default: the directory); `excludes`, glob patterns
    of other locks in the directory that a live run must not hold at the same time."""

    def __init__(self, directory: Path, name: str = NAME, what: str | None = None, excludes: tuple[str, ...] = ()):
        self.path = Path(directory) / name
        self.guard = self.path.with_name(name + ".guard")
        self.what, self.excludes = what or str(self.path.parent), excludes
        self.stop = threading.Event()
        self.me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "create_time": psutil.Process().create_time(),
            "pid_ns": pid_namespace(),
        }

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Deciding and taking over happen under an flock of a guard file: two runs that find the same stale
        # lock at the same moment are serialised, so the second sees the first's live lock, not the stale one.
        with open(self.guard, "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            while not self.try_create():
                holder, age = self.read(self.path), self.age(self.path)
                if holder is None or age is None:
                    continue  # removed between our attempt and the read: try again
                if (refusal := self.refusal(holder, age)) is not None:
                    raise Held(refusal)
                warnings.warn(
                    f"{self.path}: taking over the lock of a run that {self.gone(holder, age)} ({describe(holder)})",
                    stacklevel=2,
                )
                self.path.unlink(missing_ok=True)
        try:
            self.check_excluded()
        except BaseException:
            self.release()
            raise
        threading.Thread(target=self.beat, daemon=True).start()
        return self

    def checkable(self, holder: dict) -> bool:
        """Whether the holder's process can be looked up from here: the same host and PID namespace (a lock
        without a namespace was written before locks recorded one: its host decides)."""
        same_ns = holder.get("pid_ns") is None or holder["pid_ns"] == self.me["pid_ns"]
        return holder["host"] == self.me["host"] and same_ns

    def refusal(self, holder: dict, age: float) -> str | None:
        """Why a lock's holder may be alive, in words for the user; None once it is certainly gone."""
        if self.checkable(holder):
            return f"{self.what} is in use by another run: {describe(holder)}" if holder_alive(holder) else None
        if age >= STALE_S:
            return None
        where = "on another host" if holder["host"] != self.me["host"] else "in another PID namespace of this host"
        return (
            f"{self.what} is in use by the run of {describe(holder)} ({where}), alive {age:.0f} s ago; its lock "
            f"is taken over once untouched for {STALE_S:.0f} s, or remove {self.path} once that run is known to be over"
        )

    def gone(self, holder: dict, age: float) -> str:
        """How a lock's holder is known to be gone, in words."""
        return "ended without releasing it" if self.checkable(holder) else f"left it untouched for {age:.0f} s"

    def check_excluded(self) -> None:
        """Refuse when a live run holds one of the locks this one excludes (they check this one in turn)."""
        for pattern in self.excludes:
            for other in sorted(self.path.parent.glob(pattern)):
                if other == self.path or other.name.endswith(".guard"):
                    continue
                holder, age = self.read(other), self.age(other)
                if holder is not None and age is not None and self.refusal(holder, age) is not None:
                    raise Held(f"{self.what} is in use by another run: {describe(holder)} (it holds {other})")

    def beat(self) -> None:
        """Touch the lock every HEARTBEAT_S until released, so other hosts can tell it is held."""
        while not self.stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # removed by hand, or a filesystem's hiccup: the next beat tries again
                pass

    def age(self, lock: Path | None = None) -> float | None:
        """Seconds since `lock` (default: this one) was last touched, by the filesystem's clock (the guard, touched
        now, gives it: another host's clock may differ from ours); None when there is no lock."""
        lock = lock or self.path
        os.utime(self.guard)
        try:
            touched = lock.stat().st_mtime
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

    def read(self, lock: Path) -> dict | None:
        """The holder recorded in `lock`; None when there is none. A file cut short by a crash between its
        creation and its write is nobody's; one that is not a lock of ours is an InputError saying what to do."""
        try:
            text = lock.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{lock}: cannot be read as a run's lock ({e}); remove it once no run uses it") from None
        try:
            value = json.loads(text)
        except ValueError:
            return {**self.me, "pid": -1}
        try:
            return check_shape(lock, Holder, value)
        except InputError as e:
            raise InputError(
                f"{e}: not a run's lock as neox-data writes it; remove {lock} once no run uses {self.what}"
            ) from None

    def release(self) -> None:
        """Stop the heartbeat; remove the lock (and its guard) if this process still holds it."""
        self.stop.set()
        try:
            mine = (self.read(self.path) or {}).get("pid") == self.me["pid"]
        except InputError:
            mine = False
        if mine:
            self.path.unlink(missing_ok=True)
            self.guard.unlink(missing_ok=True)  # it serialises taking over a dead holder's lock: there is none now

    def __exit__(self, *exc):
        self.release()
