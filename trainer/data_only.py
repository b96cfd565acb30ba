"""Checkpoint files loaded as data only: a file that would run code when loaded is refused, naming it.

A `.pt` file is a pickle, and a pickle can call any function it names (a crafted `mp_rank_00_model_states.pt`
whose object's `__reduce__` calls `os.system` runs its command under a plain torch.load). Every `.pt` this project
reads, DeepSpeed's reads of its own files included, goes through torch's weights-only unpickler with the few
classes our checkpoints hold allowed by name (ALLOWED), and torch.distributed.checkpoint's `.metadata`, a plain
pickle, through a restricted unpickler that builds only DCP's own records. Checksums do not protect against a
crafted file (its author writes them too); loading as data does.
"""

import io
import pickle
import sys
from pathlib import Path

import numpy as np
import torch

from trainer.config_keys import ConfigError

WHY = "which no checkpoint holds: loading it could run code"


class Refused(ConfigError):
    """A checkpoint file that needs more than data to load, or cannot be read as one."""


# DeepSpeed's optimizer records (its loss scalers, the ZeRO stage, a parameter's place in a flat partition), by the
# names its files give them; imported (0.3 s) only for a file that holds them, or where DeepSpeed runs already.
DEEPSPEED = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
}


def allowed(with_deepspeed: bool) -> list:
    """What our checkpoints hold besides tensors and plain Python values: numpy's random state (an array and its
    dtype; each spelling of the array rebuilder that numpy 1 and 2 write), and with_deepspeed DEEPSPEED."""
    rebuild = np._core.multiarray._reconstruct
    dtypes = [type(np.dtype(t)) for t in (np.uint8, np.int32, np.uint32, np.int64, np.uint64, np.float32, np.float64)]
    classes = [rebuild, (rebuild, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype, *dtypes]
    if with_deepspeed:
        import importlib

        for name in sorted(DEEPSPEED):
            module, _, attribute = name.rpartition(".")
            classes.append(getattr(importlib.import_module(module), attribute))
    return classes


def load(path: str | Path, map_location="cpu"):
    """torch.load of a checkpoint file as data only; Refused naming the file, and what it wanted, otherwise."""
    with_deepspeed = "deepspeed" in sys.modules
    try:
        try:
            return torch_load(path, map_location, with_deepspeed)
        except pickle.UnpicklingError:
            if with_deepspeed or not set(unsafe_globals(path, False)) <= DEEPSPEED:
                raise
            return torch_load(path, map_location, True)  # a file of DeepSpeed's optimizer, read outside training
    except pickle.UnpicklingError as e:
        raise Refused(f"{path}: refused to load: {unsafe_reason(path, e)}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Refused(f"{path}: cannot be read as a checkpoint file ({first})") from None


def torch_load(path, map_location, with_deepspeed: bool):
    """torch's weights-only load, with allowed(with_deepspeed) the classes it may build."""
    with torch.serialization.safe_globals(allowed(with_deepspeed)):
        return torch.load(path, map_location=map_location, weights_only=True)


def unsafe_globals(path: str | Path, with_deepspeed: bool = True) -> list[str]:
    """The globals a checkpoint file names beyond tensors and allowed(with_deepspeed), read without running any."""
    try:
        wanted = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not torch's zip format: torch's own message says what it met
        return []
    granted = {f"{g.__module__}.{g.__qualname__}" for g in allowed(False) if not isinstance(g, tuple)}
    granted |= {g[1] for g in allowed(False) if isinstance(g, tuple)} | (DEEPSPEED if with_deepspeed else set())
    return [g for g in wanted if g not in granted]


def unsafe_reason(path: str | Path, error: Exception) -> str:
    """Why a weights-only load failed, in one line: the globals the file names that are not allowed."""
    if wanted := unsafe_globals(path):
        return f"it needs {', '.join(wanted[:3])}, {WHY}"
    message = " ".join(str(error).split())
    found = message[message.find("WeightsUnpickler error:") :] if "WeightsUnpickler error:" in message else message
    return f"it holds more than data ({found[:200]}): loading it could run code"


class DataOnlyEngine:
    """DeepSpeed's checkpoint engine with its loads made data-only: DeepSpeed reads its model, optimizer and layer
    files through `engine.checkpoint_engine.load`, whose own torch.load allows any pickle. Saving, and whatever
    else the engine does, is the wrapped engine's."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def load(self, path, map_location=None):
        """A DeepSpeed checkpoint file, as data only."""
        return load(path, map_location)


def guard_deepspeed_loads(engine) -> None:
    """Make every checkpoint read of a DeepSpeed engine data-only (its pipeline module reads through it too)."""
    if not isinstance(engine.checkpoint_engine, DataOnlyEngine):
        engine.checkpoint_engine = DataOnlyEngine(engine.checkpoint_engine)


# torch.distributed.checkpoint's metadata holds these records of its own, torch's sizes, dtypes and layouts, and
# the checkpoint's path; nothing else is built.
DCP_METADATA = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}


class MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata records and torch's dtypes only; any other global is refused, naming the file."""

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if (module, name) in DCP_METADATA or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise Refused(f"{self.path}: refused to load: it needs {module}.{name}, {WHY}")


def data_only_reader(path: Path):
    """A torch.distributed.checkpoint reader of `path` whose metadata is read as data only (the tensors it reads are
    weights-only loads already)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            where = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(where, "rb") as stream:
                data = stream.read()
            try:
                metadata = MetadataUnpickler(io.BytesIO(data), where).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
                raise Refused(f"{where}: cannot be read as a checkpoint's metadata ({e})") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(path)


def dcp_load(state_dict: dict, path: Path, group) -> None:
    """torch.distributed.checkpoint's load of `path` into `state_dict`, its metadata read as data only, first on
    its own: a crafted or damaged one is one line naming it (every rank of the group reads it, so all stop), not
    an error inside DCP's report of each rank's traceback. DCP's own failures become one line too."""
    import torch.distributed.checkpoint as dcp

    reader = data_only_reader(path)
    reader.read_metadata()
    try:
        dcp.load(state_dict, storage_reader=reader, process_group=group)
    except BaseException as e:
        if type(e).__name__ != "CheckpointException" or not getattr(e, "failures", None):
            raise
        failure = next(iter(e.failures.values()))[0]
        raise Refused(f"{path}: cannot be read ({str(failure).strip().splitlines()[-1][:300]})") from None
