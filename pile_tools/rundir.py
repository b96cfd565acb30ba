"""A training run's save directory, as the trainer writes it and every tool reads it (the files inside a
checkpoint are trainer/checkpoint.py's; its checksums.json is pile_tools/checksums.py's):

    SAVE/latest              the tag of the newest complete checkpoint: `global_step<N>`, and nothing else
    SAVE/global_step<N>/     one checkpoint (DeepSpeed's mp_rank_*_model_states.pt and more), complete once its
                             checksums.json is written
    SAVE/.lock               the run holding the directory (pile_tools/runlock.py)

`latest` is read back checked: a name other than a tag of this directory (garbage, `../other/global_step30`, an
absolute path) is refused in one line, never followed out of the run.
"""

import re
from pathlib import Path

from pile_tools.checksums import has_checksums
from pile_tools.ground import InputError, write_text

LATEST = "latest"
TAG = re.compile(r"global_step(\d+)")


def step_of(tag: str) -> int | None:
    """The step of a DeepSpeed tag like global_step100, or None."""
    return int(m[1]) if (m := TAG.fullmatch(tag)) else None


def tags_by_step(save: Path) -> list[str]:
    """The global_step<N> directories of a run, newest (highest step) first."""
    tags = [p.name for p in Path(save).glob("global_step*") if p.is_dir() and step_of(p.name) is not None]
    return sorted(tags, key=step_of, reverse=True)


class BadLatest(InputError):
    """A `latest` file that does not hold a checkpoint tag."""


def latest_file(save: Path) -> Path:
    """Where a run's `latest` is (for messages; read it with read_latest)."""
    return Path(save) / LATEST


def read_latest(save: Path) -> str | None:
    """The tag that `save`/latest names, or None without one; BadLatest when it holds anything but a tag."""
    path = latest_file(save)
    if not path.is_file():
        return None
    try:
        tag = path.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise BadLatest(f"{path}: cannot be read ({e})") from None
    if step_of(tag) is None:
        shown = tag if len(tag) <= 60 else tag[:57] + "..."
        raise BadLatest(
            f"{path}: holds {shown!r}, not a checkpoint tag of this run like global_step100; write the tag of the "
            "checkpoint to use into it, or remove it (train --load then takes the newest checkpoint that verifies)"
        )
    return tag


def write_latest(save: Path, tag: str) -> None:
    """Point `latest` at `tag`, atomically and durably (it is what a resume trusts)."""
    write_text(latest_file(save), tag, durable=True)


def checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint a path stands for: itself, or the one a training run's `latest` names."""
    path = Path(path)
    tag = read_latest(path)
    return path / tag if tag is not None else path


def checkpoints_in(root: Path) -> list[Path]:
    """The checkpoints a path names: itself when it holds checksums.json, else those of a run, by step."""
    root = Path(root)
    if has_checksums(root):
        return [root]
    found = [root / tag for tag in tags_by_step(root) if has_checksums(root / tag)] if root.is_dir() else []
    return found[::-1]


def holds_unvouched_checkpoints(root: Path) -> bool:
    """Whether a path holds checkpoints saved before they carried checksums (DeepSpeed's files, or step
    directories, without checksums.json)."""
    return any(Path(root).glob("global_step*")) or any(Path(root).glob("mp_rank_*_model_states.pt"))


def complete_tags(save: Path) -> list[str]:
    """The tags of a run's checkpoints that carry checksums.json, newest first."""
    return [tag for tag in tags_by_step(save) if has_checksums(Path(save) / tag)]
