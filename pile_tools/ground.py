"""The ground floor every package of neox-data stands on (it imports none of them): the error for bad input, the
CLI's one-line errors and warnings, writing outputs atomically (temp file, then rename) with one clear line for a
full disk or a read-only path, and reading ahead in a thread.

Every package raises InputError (or a subclass: WriteError here, TokenizerError, ConfigError) for what the user
must fix; run_reporting_errors turns it into one line and exit status 1.
"""

import contextlib
import errno
import gc
import json
import os
import queue
import re
import shutil
import threading
from pathlib import Path

import click


class InputError(Exception):
    """Input that cannot be read; the message names the file (and line) for the user."""


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# torch's writer, safetensors and C++ streams do not keep errno; these words in their messages mean a full disk
DISK_FULL_WORDS = ("no space left", "storagefull", "disk quota", "file write failed", "iostream error")


class WriteError(InputError):
    """An output that could not be written; the message names the path and why."""


def nearest_existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (where a write would fail)."""
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
    except BaseException as e:
        # torch.distributed.checkpoint's, a BaseException carrying each failed rank's (exception, trace)
        if type(e).__name__ == "CheckpointException" and getattr(e, "failures", None):
            raise write_failure(path, next(iter(e.failures.values()))[0]) from None
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


def write_text(path: Path, text: str, durable: bool = False) -> None:
    """`text` to `path` atomically: a temp file beside it, then a rename. `durable`: on the disk when this returns
    (the file and the rename synced), for a record that later steps rely on surviving a power cut."""
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    with writing(path):
        try:
            with open(tmp, "w") as f:
                f.write(text)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            if durable:
                sync_to_disk(path.parent)
        finally:
            tmp.unlink(missing_ok=True)


def file_mode() -> int:
    """The mode a new file gets from open() under this process's umask (0o644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def sync_to_disk(path: Path) -> None:
    """Flush a file's data, or a directory's entries, from the page cache to the disk. The fsync reaches the
    pages whichever process of this machine wrote them, and raises what the write-back met (EIO, ENOSPC), which
    os.sync() would not report."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj, durable: bool = False) -> None:
    """`obj` as indented JSON to `path`, atomically (and `durable`ly: see write_text)."""
    write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n", durable)


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """A matplotlib figure written atomically (temp file, then rename), then closed."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}{path.suffix}")
    with writing(path):
        # zlib level 1: a fifth of the encoding time of PIL's default 6, for files about a tenth larger
        fig.savefig(tmp, dpi=dpi, pil_kwargs={"compress_level": 1} if path.suffix == ".png" else None)
        plt.close(fig)
        os.replace(tmp, path)
    return path


class Size(click.ParamType):
    """A byte count with an optional K/M/G suffix (powers of 1024): 256M, 1G, 4096."""

    name = "size"

    def convert(self, value, param, ctx):
        """The byte count of a value like 256M (a plain int passes through)."""
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(value), re.IGNORECASE)
        if not m:
            self.fail(f"{value!r} is not a size like 256M or 1G", param, ctx)
        return int(float(m[1]) * 1024 ** " kmgt".index(m[2].lower() or " "))


def one_line_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings as `warning: MESSAGE`, without Python's file name and source line."""
    click.echo(f"warning: {message}", err=True)


@contextlib.contextmanager
def long_lived():
    """Build what the process keeps to its end (torch, DeepSpeed, the model and its engine) with Python's cyclic
    garbage collector off, then freeze it out of every later collection, the last one at exit included. Each full
    collection rescans every object so far, and those libraries make millions: start-up and exit spent ~1.5 s of a
    6.8 s tiny training run in them. What the block left in cycles (a caught exception's frames, and the tensors
    they hold) is collected once before the freeze, not kept. Process-wide: meant for a command's own process."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.collect()
        gc.freeze()
        if enabled:
            gc.enable()


def run_reporting_errors(fn, *args, **kwargs):
    """Call fn; input, tokenizer and write errors become one clear line and exit status 1, not a traceback.
    Warnings print as one line each."""
    import warnings

    warnings.showwarning = one_line_warning
    try:
        return fn(*args, **kwargs)
    except InputError as e:  # TokenizerError and WriteError too
        error = click.ClickException(str(e))
        error.exit_code = getattr(e, "exit_code", 1)  # a run stopped on request: trainer/stopping.py's STOPPED
        raise error from None
    except OSError as e:  # a write no caller wrapped: still one line, naming what the error names
        if e.errno in (*DISK_FULL, errno.EROFS, errno.EACCES, errno.EPERM):
            raise click.ClickException(str(write_failure(Path(e.filename or "the output"), e))) from None
        raise


def whole_summaries(group: click.Group) -> None:
    """List each command with its whole first docstring line (click cuts a summary at about 45 characters)."""
    for command in group.commands.values():
        command.short_help = command.short_help or (command.help or "").strip().split("\n")[0]


def echo_err(message: str) -> None:
    """A line on stderr (progress and notes; stdout carries the results)."""
    click.echo(message, err=True)


def prefetch(iterable, depth: int = 2):
    """Run `iterable` in a thread, `depth` items ahead: reading and parsing overlap the encoding."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def fill():
        try:
            for item in iterable:
                q.put(item)
            q.put(done)
        except BaseException as e:  # re-raised in the consumer, with the input's own message
            q.put(e)

    threading.Thread(target=fill, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
