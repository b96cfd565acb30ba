"""The ground floor's reader of what the tools wrote and now read back (blend.json, manifest.json, plan.json,
receipts, checksums.json, locks, index caches): a file is parsed, then its shape checked against a pydantic model
of the fields its readers use, and anything else is one line naming the file and the field. It stands on
ground.py only.

Models are strict (a count is a JSON integer, not "5"), allow fields they do not name (a newer writer's, a note
added by hand), and refuse NaN and infinities. A path a file names inside its own directory is relative and never
climbs out of it (no absolute path, no `..`), so an edited file cannot send a reader, or a writer, elsewhere.
"""

import json
from pathlib import Path, PurePosixPath
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from pile_tools.ground import InputError


class Record(BaseModel):
    """A JSON object as a tool of ours writes it: the fields named are checked, others are kept unread."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


def relative_inside(value: str) -> str:
    """`value` when it names a place inside its directory: relative, no `..`; else a ValueError saying why."""
    path = PurePosixPath(value)
    if not value or path.is_absolute() or value.startswith("~") or ".." in path.parts:
        raise ValueError(f"{value!r} is not a path inside its directory")
    return value


Count = Annotated[int, Field(ge=0)]
Weight = Annotated[float, Field(ge=0, strict=False, allow_inf_nan=False)]  # a JSON integer is a weight too
Inside = Annotated[str, AfterValidator(relative_inside)]


def read_json(path: Path):
    """The JSON value of `path`; an InputError naming it when it cannot be read or is not JSON (cut short, say)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text, so not the JSON file expected there") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return json.loads(text, parse_constant=refuse_constant)
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e}); the file is damaged or was cut short") from None


def refuse_constant(name: str):
    """json's hook for NaN and Infinity, which no file of ours holds."""
    raise ValueError(f"{name} is not a JSON number")


def check_shape(path: Path, model: type[BaseModel], value):
    """`value`, read from `path`, when it has the shape `model` describes; else an InputError naming the file and
    the first field that is wrong."""
    try:
        model.model_validate(value)
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        where = "".join(f"{key}: " for key in [".".join(map(str, error["loc"]))] if key)
        raise InputError(f"{path}: {where}{describe(error)}") from None
    return value


OBJECT_TYPES = ("model_type", "model_attributes_type", "dict_type")


def describe(error: dict) -> str:
    """A pydantic error in words, with the value found when it is short."""
    if error["type"] == "missing":
        return "missing"
    if error["type"] in OBJECT_TYPES:
        what = "should be a JSON object"
    elif error["type"] == "value_error":
        return str(error["ctx"]["error"])
    else:
        what = error["msg"].removeprefix("Input ")
        what = what[0].lower() + what[1:]
    found = error.get("input")
    shown = json.dumps(found) if isinstance(found, (str, int, float, bool, type(None))) else type(found).__name__
    return f"{what}, found {shown if len(shown) <= 40 else shown[:37] + '...'}"


def read_record(path: Path, model: type[BaseModel]):
    """A JSON file parsed and checked against `model` (see check_shape); the plain value, as read."""
    return check_shape(path, model, read_json(path))


def inside(root: Path, relative: str) -> Path:
    """`root`/`relative`, for a `relative` a file has already been checked to name inside `root`."""
    return Path(root) / relative_inside(relative)
