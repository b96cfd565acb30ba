"""Atomic writes: a reader sees the old file or the new one, never half of one (temp file, then rename)."""

import json
import os
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
