"""Checkpoints of the model (conversion to and from Hugging Face's GPT-NeoX: trainer/hf.py).

A checkpoint is a directory holding `config.yml` (gpt-neox keys), `tokenizer/` (what AutoTokenizer reads) and the
weights: `model.safetensors` (import-hf, or a standalone save), or DeepSpeed's files as the trainer writes them:
    <save>/latest                                  the tag of the newest complete checkpoint, replaced atomically
    <save>/global_step<N>/mp_rank_00_model_states.pt   weights ("module"), our client state, scheduler
    <save>/global_step<N>/*optim_states.pt         optimizer states (per ZeRO partition)
    <save>/global_step<N>/rng_state_<rank>.pt      each rank's RNG states
    <save>/global_step<N>/universal/<part>/        weights and Adam's state by full name, for any layout (universal.py)
A training run's save directory stands for its latest checkpoint. The state dict keys are HF's, so converting is
a rename of the output layer at most: `embed_out` here and in transformers 4 and the released checkpoints,
`lm_head` inside transformers 5, which reads `embed_out` files too.
"""

import json
import os
import shutil
import socket
import warnings
from pathlib import Path

import torch
import yaml

from pile_tools.checksums import (
    first_problem,
    hash_files,
    listed_files,
    read_checksums,
    verify_directory,
    write_checksums,
)
from pile_tools.ground import WriteError, file_mode, sync_to_disk, write_failure, write_text, writing
from pile_tools.rundir import BadLatest, checkpoint_dir, complete_tags, read_latest, step_of, tags_by_step, write_latest
from trainer import data_only
from trainer.config import ConfigError, NeoXConfig, load_config, to_yaml_dict
from trainer.config_keys import RunError
from trainer.model import GPTNeoX
from trainer.reshard import checkpoint_layout, load_other_layout, load_state_dict
from trainer.universal import innermost, save_universal


def copy_tokenizer(source: Path, dest: Path) -> None:
    """Copy a tokenizer directory's files (or one tokenizer.json, adding what transformers needs)."""
    from tokenizer.train import transformers_files

    dest.mkdir(parents=True, exist_ok=True)
    if source.is_file():
        shutil.copy(source, dest / "tokenizer.json")
        for name, obj in transformers_files(add_prefix_space=False).items():
            (dest / name).write_text(json.dumps(obj, indent=1))
        return
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, dest / name)


def save_weights(model: GPTNeoX, path: Path) -> None:
    """The state dict as safetensors, with the metadata transformers looks for."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata={"format": "pt"})
    os.chmod(path, file_mode())  # safetensors creates it 0600: unreadable to the rest of a cluster's group


def save_checkpoint(model: GPTNeoX, config: NeoXConfig, path: str | Path, tokenizer: Path | None = None) -> Path:
    """Write a checkpoint directory; `tokenizer` is a tokenizer.json or a directory holding one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(path):
        try:
            tmp.mkdir(parents=True)
            (tmp / "config.yml").write_text(yaml.safe_dump(to_yaml_dict(config), sort_keys=False))
            save_weights(model, tmp / "model.safetensors")
            if tokenizer is not None:
                copy_tokenizer(Path(tokenizer), tmp / "tokenizer")
            write_checksums(tmp, hash_files(tmp, listed_files(tmp)))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    return path


def verify_checkpoint(path: Path, on_all_ranks: bool = False) -> None:
    """A ConfigError naming the first file of the checkpoint that does not match its checksums.json; a note for a
    checkpoint written before checksums. `on_all_ranks`: the ranks share the hashing, and rank 0 notes."""
    problems = verify_on_all_ranks(path) if on_all_ranks else verify_directory(path)
    if problems is None:
        note = f"{path} was written before checkpoints carried checksums: not verified"
        if on_all_ranks:
            warn_once(note)
        else:
            warnings.warn(note, stacklevel=2)
    elif problems:
        raise ConfigError(f"{path} does not verify: {first_problem(problems)}")


def load_checkpoint(path: str | Path, device="cpu") -> tuple[GPTNeoX, NeoXConfig]:
    """The model and config of a checkpoint (or a run's latest one), verified against its checksums first."""
    path = checkpoint_dir(path)
    if not (path / "config.yml").is_file():
        raise ConfigError(f"{path}: not a checkpoint (no config.yml)")
    verify_checkpoint(path)
    config = load_config(path / "config.yml")
    model = GPTNeoX(config.model)
    weights = load_state_dict(path)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # missing or unexpected keys, other shapes
        first = " ".join(str(e).split("\n\t")[1:2]) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: its weights are not the model its config.yml describes ({first[:300]})") from None
    return model.to(device), config


def rng_states() -> dict:
    """The Python, numpy, torch (and CUDA) generator states of this rank, saved with a checkpoint."""
    import random

    import numpy as np

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    """Restore the generator states that rng_states() saved."""
    import random

    import numpy as np

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def prune_checkpoints(save: Path, keep: int, run_id: str, protected: set[str]) -> None:
    """Delete this run's checkpoints (the ones whose checksums.json carries its id) beyond the `keep` newest,
    never one of `protected` (the latest, a checkpoint resumed from after a fallback), never another run's."""
    ours = [t for t in tags_by_step(save) if (read_checksums(save / t) or {}).get("run_id") == run_id]
    for tag in ours[keep:]:
        if tag not in protected:
            shutil.rmtree(save / tag, ignore_errors=True)


def finite_states(engine) -> bool:
    """Whether this rank's weights and optimizer states (fp32 masters and moments) are all finite."""
    tensors = list(engine.module.parameters())
    optimizer = innermost(engine.optimizer)  # inside DeepSpeed's fp16/bf16/ZeRO wrappers
    for group in optimizer.param_groups:
        tensors += group["params"]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def all_ranks(flag: bool) -> bool:
    """True when `flag` holds on every rank."""
    import torch.distributed as dist

    t = torch.tensor([0 if flag else 1])
    dist.all_reduce(t)
    return t.item() == 0


def files_of(where: Path) -> list[str]:
    """The files of a checkpoint as rank 0 lists them, on every rank (one listing, not one per rank)."""
    import torch.distributed as dist

    names = [listed_files(where) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(names, src=0)
    return names[0]


def hash_on_all_ranks(where: Path, names: list[str]) -> dict:
    """Checksums of the named files of a checkpoint, each rank hashing its share of them."""
    import torch.distributed as dist

    mine = hash_files(where, names[dist.get_rank() :: dist.get_world_size()])
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {k: v for part in gathered for k, v in part.items()}


def machine() -> str:
    """What tells this machine's page cache from another's: the kernel's boot id (containers on one host share
    it, two hosts never do), else the host name."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


def machine_share(machines: list[str], rank: int) -> tuple[int, int]:
    """(this rank's index among the ranks on its machine, how many they are), from every rank's machine()."""
    peers = [r for r, m in enumerate(machines) if m == machines[rank]]
    return peers.index(rank), len(peers)


def sync_on_each_machine(where: Path, names: list[str]) -> None:
    """A checkpoint's files and directories on the disk, the ranks of each machine fsyncing a share of them all:
    an fsync flushes the pages any process of the machine wrote (on a shared filesystem, those this machine
    wrote), so the save waits for its own files only, not for everything else in the page cache as os.sync()
    would, and a failed write-back is an error naming the file, which os.sync() would not report. Every rank
    raises if any failed, so none waits for the others in a collective."""
    import torch.distributed as dist

    machines = [None] * dist.get_world_size()
    dist.all_gather_object(machines, machine())
    index, count = machine_share(machines, dist.get_rank())
    directories = sorted({str(parent) for n in names for parent in Path(n).parents})  # "." and every one below
    paths = [where / n for n in names] + [where / d for d in directories] + [where.parent]
    problem = None
    for path in paths[index::count]:
        try:
            sync_to_disk(path)
        except OSError as e:
            problem = str(write_failure(path, e))
            break
    if not all_ranks(problem is None):
        raise WriteError(problem or f"another rank could not write {where} to the disk")


def save_training_checkpoint(
    engine, config: NeoXConfig, save: Path, step: int, state: dict, tokenizer, identity: dict, protected: set[str]
) -> Path:
    """A DeepSpeed checkpoint of step `step`, with the data position and RNG states, the parsed config, the
    tokenizer and checksums.json; `latest` names it only once every rank has written, synced and hashed every
    file, so a save cut short (by SIGKILL, or a power cut before the page cache reached the disk) never becomes the
    latest, and older checkpoints are pruned only once a newer one is on the disk. Non-finite weights or optimizer
    states are never saved."""
    import torch.distributed as dist

    tag = f"global_step{step}"
    where, rank = save / tag, dist.get_rank()
    if not all_ranks(finite_states(engine)):
        raise RunError(
            f"step {step}: the weights or optimizer states hold nan or inf; not saving {where} "
            f"(the latest checkpoint stays {has_run(save) or 'none'})"
        )
    if rank == 0 and where.exists():  # a save cut short, or a checkpoint that did not verify: written anew
        shutil.rmtree(where)
    dist.barrier()
    try:
        with writing(where):
            engine.save_checkpoint(str(save), tag=tag, client_state=state, save_latest=False)
            if config.training.universal_checkpoint:
                save_universal(engine, config, where)
            tmp = where / f"rng_state_{rank}.pt.tmp"
            torch.save(rng_states(), tmp)
            tmp.replace(where / f"rng_state_{rank}.pt")
            if rank == 0:
                write_text(where / "config.yml", yaml.safe_dump(to_yaml_dict(config), sort_keys=False))
                if tokenizer is not None:
                    copy_tokenizer(Path(tokenizer), where / "tokenizer")
        dist.barrier()
        names = files_of(where)
        sync_on_each_machine(where, names)
    except WriteError:
        if rank == 0:  # half a checkpoint is of no use, and on a full disk it holds the space others need
            shutil.rmtree(where, ignore_errors=True)
        raise
    files = hash_on_all_ranks(where, names)
    if rank == 0:
        write_checksums(where, files, **identity, step=step)
        write_latest(save, tag)
        if config.training.keep_last_n_checkpoints:
            prune_checkpoints(save, config.training.keep_last_n_checkpoints, identity["run_id"], protected | {tag})
    dist.barrier()
    return where


def has_run(save: Path) -> str | None:
    """The newest checkpoint a directory holds (`latest`, or a complete one without it), or None."""
    if not save.is_dir():
        return None
    tags = complete_tags(save)
    try:
        latest = read_latest(save)
    except BadLatest:
        if not tags:
            raise
        latest = None  # choose_checkpoint says so, and takes the newest that verifies
    return latest or (tags[0] if tags else None)


def verify_on_all_ranks(where: Path) -> list[str] | None:
    """Problems of a checkpoint against its checksums.json, each rank checking its share; None without one."""
    import torch.distributed as dist

    mine = verify_directory(where, part=(dist.get_rank(), dist.get_world_size()))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return None if mine is None else sorted(p for part in gathered for p in part)


def warn_once(message: str) -> None:
    """A warning from rank 0 only: every rank reaches the same verdict."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        warnings.warn(message, stacklevel=3)


IDENTITY = ("run_id", "started_from")  # what checksums.json records of the run: its id, the weights it started from


def run_identity(checksums: dict) -> dict:
    """The run's identity that a checkpoint's checksums.json records (see IDENTITY)."""
    return {k: checksums[k] for k in IDENTITY if k in checksums}


def choose_checkpoint(load: Path) -> tuple[str, bool, dict]:
    """(tag, whether it is a fallback, its run's identity): `latest` if it verifies, else the newest older one that
    does.
    A checkpoint written before checksums loads unverified, with a note."""
    tags = tags_by_step(load)
    try:
        latest = read_latest(load)
    except BadLatest as e:
        warn_once(f"{e}; trying the newest checkpoint that verifies")
        latest = None
    newest = step_of(latest) if latest else float("inf")  # no `latest`: a kill between checksums and `latest`
    candidates = ([latest] if latest else []) + [t for t in tags if step_of(t) < newest]
    legacy = not complete_tags(load)  # a run from before checksums
    for tag in candidates:
        problems = verify_on_all_ranks(load / tag) if (load / tag).is_dir() else [f"{load / tag}: missing"]
        if problems is None and not legacy:
            problems = [f"{load / tag}: no checksums.json (a save cut short?)"]
        if problems is None:
            warn_once(f"{load / tag} was written before checkpoints carried checksums: loaded unverified")
            return tag, tag != latest, {}
        if not problems:
            return tag, tag != latest, run_identity(read_checksums(load / tag))
        warn_once(f"{tag} does not verify: {first_problem(problems)}; trying the previous checkpoint")
    raise ConfigError(f"--load: no checkpoint in {load} verifies (tried {', '.join(candidates) or 'none'})")


def starting_weights(path: Path) -> Path:
    """The checkpoint whose weights start a run at step 0 (gpt-neox's finetune): a run's newest checkpoint that
    verifies, or `path` itself, verified on all ranks."""
    if has_run(path) is not None:
        tag, _, _ = choose_checkpoint(path)
        return path / tag
    verify_checkpoint(path, on_all_ranks=True)
    return path


def load_training_checkpoint(
    engine, load: Path, chosen: tuple, config: NeoXConfig, layout: tuple, tp_rank: int, pipelined: bool
) -> dict:
    """Restore this run from `load`'s checkpoint `chosen` (choose_checkpoint's answer): everything when it was
    saved in the same (TP, PP, DP) layout, else weights, step, data position and schedule (trainer/reshard.py).
    Returns the step, the data position and its order's record, the tag, whether it was a fallback and the run's
    identity."""
    import torch.distributed as dist

    tag, fallback, identity = chosen
    where = load / tag
    if fallback:
        warn_once(f"--load: resuming from {where}, the newest checkpoint that verifies")
    if checkpoint_layout(where)[1] != tuple(layout):
        state = load_other_layout(engine, where, config, tp_rank, pipelined)
        path = where / "mp_rank_00_model_states.pt"
    else:
        path, state = engine.load_checkpoint(str(load), tag=tag)
    if path is None:
        raise ConfigError(f"--load: the checkpoint in {where} could not be read")
    rng = Path(path).parent / f"rng_state_{dist.get_rank()}.pt"
    if not rng.is_file():  # a checkpoint with another layout: keep this run's seeds
        rng = Path(path).parent / "rng_state_0.pt"
    set_rng_states(data_only.load(rng))
    return {**state, "tag": tag, "fallback": fallback, "identity": identity}
