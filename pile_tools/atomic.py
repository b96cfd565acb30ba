"""Writing outputs safely: atomic writes (a reader sees the old file or the new one, never half of one), a check
that an output place is writable before long work, and write failures (a full disk, a read-only place) reported
as one line naming the path instead of a traceback from deep inside numpy, torch or safetensors."""

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

from pile_tools.reader import InputError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# torch's writer, safetensors and C++ streams do not keep errno; these words in their messages mean a full disk
DISK_FULL_WORDS = ("no space left", "storagefull", "disk quota", "file write failed", "iostream error")


class WriteError(InputError):
    """An output that could not be written; the message names the path and why."""


def nearest_existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_failure(path: Path, e: BaseException) -> WriteError:
    """The one-line error for a failed write of `path`."""
    if isinstance(e, WriteError):
        return e
    text = str(e).lower()
    code = getattr(e, "errno", None)
    try:
        free = shutil.disk_usage(nearest_existing(path)).free
    except OSError:
        free = None
    if code in DISK_FULL or any(w in text for w in DISK_FULL_WORDS) or free == 0:
        reason = "no space left on device"
    elif code is not None and getattr(e, "strerror", None):
        reason = e.strerror.lower()
    else:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return WriteError(f"{reason} while writing {path}")


@contextlib.contextmanager
def writing(path: Path):
    """Report any failure of the writes inside as a WriteError naming `path`."""
    try:
        yield
    except (OSError, RuntimeError) as e:  # torch's writer raises RuntimeError
        raise write_failure(path, e) from None
    except Exception as e:
        if type(e).__name__ == "SafetensorError":  # safetensors' own class, a plain Exception
            raise write_failure(path, e) from None
        raise


def check_writable(directory: Path) -> Path:
    """Create `directory` if needed and prove a file can be written there, before any long work."""
    directory = Path(directory)
    probe = directory / f".write-test-{os.getpid()}"
    with writing(directory):
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    return directory


def write_text(path: Path, text: str) -> None:
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    with writing(path):
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
