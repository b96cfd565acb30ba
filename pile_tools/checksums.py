"""Content checksums of files (xxh3-128, ~10 GB/s a core) and the `checksums.json` that vouches for a directory.

`DIR/checksums.json`, written last and atomically once every other file of DIR is complete:
    {"algorithm": "xxh3_128", "files": {"relative/path": {"size": bytes, "xxh3_128": "hex"}}, ...extra keys}
A directory verifies when every file it lists exists with its size and hash. Files not listed (a later addition)
are not judged; a missing checksums.json means the directory predates checksums and cannot be vouched for.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import xxhash

from pile_tools.ground import InputError, write_json
from pile_tools.readback import Count, Inside, Record, read_record

NAME = "checksums.json"
ALGORITHM = "xxh3_128"
CHUNK = 16 << 20


def file_hash(path: Path) -> str:
    """xxh3-128 of a file's bytes, read in 16 MB chunks into one reused buffer."""
    h = xxhash.xxh3_128()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def listed_files(directory: Path) -> list[str]:
    """Every file under `directory` but the checksums file itself and temp files, as sorted relative paths."""
    return sorted(
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.is_file() and p.name != NAME and ".tmp" not in p.name
    )


def hash_files(directory: Path, names: list[str], threads: int | None = None) -> dict[str, dict]:
    """{name: {"size", "xxh3_128"}} of the named files, hashed on a few threads (reads release the GIL)."""
    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        hashes = list(pool.map(lambda n: file_hash(directory / n), names))
    return {n: {"size": (directory / n).stat().st_size, ALGORITHM: h} for n, h in zip(names, hashes)}


def write_checksums(directory: Path, files: dict[str, dict], **extra) -> None:
    """checksums.json of `directory` (atomically and durably: it vouches for files on the disk), with `extra`
    fields such as run_id and step."""
    write_json(directory / NAME, {"algorithm": ALGORITHM, "files": files, **extra}, durable=True)


class FileRecord(Record):
    size: Count
    xxh3_128: str


class Checksums(Record):
    algorithm: Literal["xxh3_128"]
    files: dict[Inside, FileRecord]
    run_id: str | None = None
    started_from: str | None = None
    step: Count | None = None


def read_checksums(directory: Path) -> dict | None:
    """The directory's checksums.json, checked, or None when it has none (written before checksums existed). One
    that cannot be read, or is not as this module writes it, records no file and says why: {"unreadable": why}."""
    path = directory / NAME
    if not path.is_file():
        return None
    try:
        return read_record(path, Checksums)
    except InputError as e:
        return {"algorithm": ALGORITHM, "files": {}, "unreadable": str(e)}


def check_files(directory: Path, recorded: dict, names: list[str]) -> list[str]:
    """Problems (one line each, naming the file) of the recorded files `names`."""
    problems = []
    for name in names:
        want, path = recorded["files"][name], directory / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{path}: {path.stat().st_size:,} bytes, {want['size']:,} recorded")
        elif file_hash(path) != want[ALGORITHM]:
            problems.append(f"{path}: content differs from its recorded checksum")
    return problems


def verify_directory(directory: Path, part: tuple[int, int] = (0, 1), pool=None, progress=None) -> list[str] | None:
    """Problems of a directory against its checksums.json; [] when it verifies, None when it has none.
    part=(i, n) checks only every n-th recorded file from the i-th, for n processes sharing the work; `pool`, a
    thread pool to hash the files on, `progress(bytes)` told of each file checked."""
    recorded = read_checksums(directory)
    if recorded is None:
        return None
    if recorded.get("unreadable"):
        return [recorded["unreadable"]] if part[0] == 0 else []

    def check(name: str) -> list[str]:
        problems = check_files(directory, recorded, [name])
        if progress is not None:
            progress(recorded["files"][name]["size"])
        return problems

    names = sorted(recorded["files"])[part[0] :: part[1]]
    return [line for lines in (pool.map(check, names) if pool else map(check, names)) for line in lines]


def has_checksums(directory: Path) -> bool:
    """Whether a directory carries a checksums.json (a checkpoint saved whole, since checksums)."""
    return (Path(directory) / NAME).is_file()


def recorded_bytes(directory: Path) -> int:
    """The bytes of the files a directory's checksums.json records (0 without a readable one)."""
    return sum(f["size"] for f in (read_checksums(directory) or {}).get("files", {}).values())


def first_problem(problems: list[str]) -> str:
    """The first problem, and how many more there are."""
    return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
