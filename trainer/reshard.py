"""Checkpoints across parallel layouts: one full state dict from any layout, and this rank's part of it in another.

A pipelined run's checkpoint holds one file per layer and TP rank, `layer_{i:02d}-model_{t:02d}-model_states.pt`,
keyed within the layer (`attention.dense.weight`). Layer i is part i of `layout.pipeline_parts` (0 embed_in,
1..L the blocks, L+1 final_layer_norm, L+2 embed_out); TP shards are joined along the dimension
`tensor_parallel.PARTITION_DIM` names, and replicated tensors are taken from TP rank 0. The reverse cut gives a rank of
any layout its own tensors. Resuming in another layout restores weights, step, data position and learning-rate
schedule, and Adam's moments from the checkpoint's universal copy (trainer/universal.py: DeepSpeed's own files tie
them to the layout they were saved in); without one (universal_checkpoint: false, fp16 without ZeRO, a checkpoint
from before it) the moments restart, with a warning.
"""

import re
import warnings
from pathlib import Path

import torch

from trainer import data_only
from trainer.config import ConfigError, NeoXConfig, load_config
from trainer.layout import pipeline_parts
from trainer.tensor_parallel import partition_dim
from trainer.universal import UNIVERSAL, load_universal

LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")


def layer_prefixes(num_layers: int) -> list[str]:
    """The full state dict's key prefix of each pipeline layer."""
    return [f"{path}." for _, path in pipeline_parts(num_layers)]


def merge_layer_files(path: Path, num_layers: int) -> dict:
    """The full fp32 state dict of a pipelined checkpoint directory."""
    files: dict[int, dict[int, Path]] = {}
    for f in path.iterdir():
        if m := LAYER_FILE.fullmatch(f.name):
            files.setdefault(int(m[1]), {})[int(m[2])] = f
    prefixes = layer_prefixes(num_layers)
    if sorted(files) != list(range(len(prefixes))):
        raise ConfigError(f"{path}: expected layer files 0..{len(prefixes) - 1}, found {sorted(files)}")
    full = {}
    for layer, by_rank in files.items():
        shards = [data_only.load(by_rank[t]) for t in sorted(by_rank)]
        for key in shards[0]:
            name = prefixes[layer] + key
            dim = partition_dim(name)
            if dim is None and not all(torch.equal(s[key], shards[0][key]) for s in shards):
                warnings.warn(f"{path}: replicated {name} differs across TP ranks; taking rank 0's", stacklevel=2)
            full[name] = (torch.cat([s[key] for s in shards], dim) if dim is not None else shards[0][key]).float()
    return full


def is_pipelined(path: Path) -> bool:
    """True for a checkpoint saved by the pipeline engine (one file per layer and TP rank)."""
    return any(LAYER_FILE.fullmatch(f.name) for f in path.iterdir())


def checkpoint_layout(path: Path) -> tuple[NeoXConfig, tuple[int, int, int]]:
    """(the checkpoint's config, its (TP, PP, DP)); DP from the per-rank RNG files, so no model states are read."""
    config = load_config(path / "config.yml")
    p = config.parallel
    ranks = len(list(path.glob("rng_state_*.pt")))
    if ranks == 0:
        raise ConfigError(f"{path}: no rng_state_<rank>.pt files; the checkpoint is incomplete")
    return config, (
        p.model_parallel_size,
        p.pipe_parallel_size,
        ranks // (p.model_parallel_size * p.pipe_parallel_size),
    )


def local_state(full: dict, module, tp_rank: int, tp: int, pipelined: bool, num_layers: int) -> dict:
    """The part of `full` that `module` (a plain model, or a rank's PipelineModule) holds."""
    if not pipelined:
        return full
    prefixes = layer_prefixes(num_layers)
    out = {}
    for key in module.state_dict():
        layer, _, rest = key.partition(".")
        name = prefixes[int(layer)] + rest
        dim = partition_dim(name)
        out[key] = full[name].chunk(tp, dim)[tp_rank].clone() if dim is not None and tp > 1 else full[name]
    return out


def holds_weights(path: Path) -> bool:
    """Whether a directory is a checkpoint with weights: config.yml with model.safetensors (import-hf's output),
    DeepSpeed's model states, or a pipelined run's layer files."""
    if not (path / "config.yml").is_file():
        return False
    return (
        (path / "model.safetensors").is_file() or (path / "mp_rank_00_model_states.pt").is_file() or is_pipelined(path)
    )


def load_state_dict(path: Path) -> dict:
    """The weights of a checkpoint directory, in fp32: safetensors, DeepSpeed's model states, or a pipelined run's
    layer files joined across TP ranks."""
    from safetensors.torch import load_file

    if not path.is_dir() or not holds_weights(path):
        raise ConfigError(
            f"{path}: not a checkpoint (config.yml with model.safetensors or DeepSpeed's "
            "mp_rank_00_model_states.pt expected)"
        )
    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    if is_pipelined(path):  # any TP x PP layout: one full state dict
        return merge_layer_files(path, load_config(path / "config.yml").model.num_layers)
    module = model_states(path).get("module")
    if not isinstance(module, dict):
        raise ConfigError(f"{path / 'mp_rank_00_model_states.pt'}: holds no weights ('module')")
    return {k: v.float() for k, v in module.items()}


def model_states(path: Path) -> dict:
    """DeepSpeed's model states of a checkpoint (weights, step, our client state), read as data only."""
    states = data_only.load(path / "mp_rank_00_model_states.pt")
    if not isinstance(states, dict) or not isinstance(states.get("iteration", 0), int):
        raise ConfigError(f"{path / 'mp_rank_00_model_states.pt'}: not DeepSpeed's model states")
    return states


def load_other_layout(engine, path: Path, config: NeoXConfig, tp_rank: int, pipelined: bool) -> dict:
    """Weights and Adam's state (resharded), step, data position and schedule of a checkpoint saved in another
    layout; the moments restart when it has no universal copy."""
    _, layout = checkpoint_layout(path)  # the shapes agree: trainer/preflight.py checked them
    universal = (path / UNIVERSAL).is_dir()
    if universal:
        load_universal(engine, config, path)
    else:
        full = load_state_dict(path)
        tp = config.parallel.model_parallel_size
        module = engine.module
        module.load_state_dict(local_state(full, module, tp_rank, tp, pipelined, config.model.num_layers))
        if hasattr(engine.optimizer, "refresh_fp32_params"):  # fp16/bf16/ZeRO: the fp32 masters follow the weights
            engine.optimizer.refresh_fp32_params()
    states = model_states(path)
    step = int(states["iteration"])
    engine.lr_scheduler.last_epoch = step - 1
    with warnings.catch_warnings():  # torch warns of a schedule stepped before the optimizer: set on purpose here
        warnings.simplefilter("ignore", UserWarning)
        engine.lr_scheduler.step()  # the rate of step `step`
    engine.global_steps, engine.global_samples = step, int(states["consumed_samples"])
    saved_as = f"{path} was saved with TP x PP x DP = {' x '.join(map(str, layout))}"
    note = f"{saved_as}: weights, Adam's moments, step and data position restored from its universal copy"
    if not universal:
        note = None
        warnings.warn(
            f"{saved_as} and has no universal copy: weights, step and data position restored; the optimizer's "
            "moments restart",
            stacklevel=2,
        )
    return {
        "iteration": step,
        "consumed_samples": int(states["consumed_samples"]),
        "data_order": states.get("data_order"),
        "note": note,
    }
