"""Checkpoints of the model, and conversion to and from Hugging Face's GPT-NeoX.

A checkpoint is a directory holding `config.yml` (gpt-neox keys), `tokenizer/` (what AutoTokenizer reads) and the
weights: `model.safetensors` (import-hf, or a standalone save), or DeepSpeed's files as the trainer writes them:
    <save>/latest                                  the tag of the newest complete checkpoint, replaced atomically
    <save>/global_step<N>/mp_rank_00_model_states.pt   weights ("module"), our client state, scheduler
    <save>/global_step<N>/*optim_states.pt         optimizer states (per ZeRO partition)
    <save>/global_step<N>/rng_state_<rank>.pt      each rank's RNG states
A training run's save directory stands for its latest checkpoint. The state dict keys are HF's, so converting is
a rename of the output layer at most: `embed_out` here and in transformers 4 and the released checkpoints,
`lm_head` inside transformers 5, which reads `embed_out` files too.
"""

import json
import shutil
import warnings
from pathlib import Path

import torch
import yaml

from pile_tools.atomic import write_text
from trainer.config import ConfigError, NeoXConfig, load_config, to_yaml_dict
from trainer.model import GPTNeoX, ModelConfig

HF_ACT = {"tanh": "gelu_pytorch_tanh", "none": "gelu"}
FROM_HF_ACT = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu": "none"}


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


def save_checkpoint(model: GPTNeoX, config: NeoXConfig, path: str | Path, tokenizer: Path | None = None) -> Path:
    """Write a checkpoint directory; `tokenizer` is a tokenizer.json or a directory holding one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.yml").write_text(yaml.safe_dump(to_yaml_dict(config), sort_keys=False))
    save_weights(model, tmp / "model.safetensors")
    if tokenizer is not None:
        copy_tokenizer(Path(tokenizer), tmp / "tokenizer")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint a path stands for: itself, or the one a training run's `latest` names."""
    path = Path(path)
    latest = path / "latest"
    return path / latest.read_text().strip() if latest.is_file() else path


def load_state_dict(path: Path) -> dict:
    """The weights of a checkpoint directory, in fp32: safetensors, DeepSpeed's model states, or a pipelined run's
    layer files joined across TP ranks (trainer/reshard.py)."""
    from safetensors.torch import load_file

    from trainer.reshard import is_pipelined, merge_layer_files

    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    if path.is_dir() and is_pipelined(path):  # any TP x PP layout: one full state dict
        return merge_layer_files(path, load_config(path / "config.yml").model.num_layers)
    states = path / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise ConfigError(f"{path}: not a checkpoint (config.yml with model.safetensors or DeepSpeed's "
                          "mp_rank_00_model_states.pt expected)")  # fmt: skip
    module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in module.items()}


def load_checkpoint(path: str | Path, device="cpu") -> tuple[GPTNeoX, NeoXConfig]:
    path = checkpoint_dir(path)
    if not (path / "config.yml").is_file():
        raise ConfigError(f"{path}: not a checkpoint (no config.yml)")
    config = load_config(path / "config.yml")
    model = GPTNeoX(config.model)
    model.load_state_dict(load_state_dict(path))
    return model.to(device), config


def hf_config(m: ModelConfig, eod: int = 0):
    """The GPTNeoXConfig of a model: built through the class, so transformers 4 and 5 each store it their way."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=m.padded_vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, intermediate_size=m.intermediate_size,
        hidden_act=HF_ACT[m.gelu_approximate], rotary_pct=m.rotary_pct, rotary_emb_base=m.rotary_emb_base,
        max_position_embeddings=m.max_position_embeddings, layer_norm_eps=m.layernorm_epsilon,
        use_parallel_residual=m.gpt_j_residual, tie_word_embeddings=False, bos_token_id=eod, eos_token_id=eod,
        architectures=["GPTNeoXForCausalLM"],
    )  # fmt: skip


def model_config_from_hf(c) -> ModelConfig:
    """Our ModelConfig from a GPTNeoXConfig of transformers 4 (rotary_pct) or 5 (rope_parameters)."""
    rope = getattr(c, "rope_parameters", None) or {}
    rotary_pct = rope.get("partial_rotary_factor", getattr(c, "rotary_pct", 1.0))
    base = rope.get("rope_theta", getattr(c, "rotary_emb_base", 10000))
    if c.hidden_act not in FROM_HF_ACT:
        raise ConfigError(f"hidden_act {c.hidden_act!r} is not a GELU this model implements")
    if getattr(c, "tie_word_embeddings", False):
        raise ConfigError("tie_word_embeddings: GPT-NeoX's input and output embeddings are untied")
    return ModelConfig(
        num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
        vocab_size=c.vocab_size, max_position_embeddings=c.max_position_embeddings, rotary_pct=rotary_pct,
        rotary_emb_base=int(base), gpt_j_residual=c.use_parallel_residual, intermediate_size=c.intermediate_size,
        layernorm_epsilon=c.layer_norm_eps, gelu_approximate=FROM_HF_ACT[c.hidden_act],
        make_vocab_size_divisible_by=128 if c.vocab_size % 128 == 0 else 1,
    )  # fmt: skip


def export_hf(checkpoint: str | Path, output: str | Path, tokenizer: str | None = None) -> Path:
    """Write config.json, model.safetensors and the tokenizer files that GPTNeoXForCausalLM/AutoTokenizer load."""
    from tokenizer.engine import resolve_tokenizer

    model, config = load_checkpoint(checkpoint)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    source = resolve_tokenizer(tokenizer) if tokenizer else checkpoint_dir(checkpoint) / "tokenizer"
    if not (source.is_file() or (source / "tokenizer.json").is_file()):
        warnings.warn(f"{checkpoint} holds no tokenizer; shipping the released GPT-NeoX-20B one", stacklevel=2)
        source = resolve_tokenizer("gpt-neox-20b")
    copy_tokenizer(source, out)
    hf_config(config.model).save_pretrained(out)
    save_weights(model, out / "model.safetensors")
    return out


def import_hf(hf_dir: str | Path, output: str | Path) -> Path:
    """A checkpoint from a Hugging Face GPT-NeoX directory (Pythia, GPT-NeoX-20B, or our own export)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hf_dir = Path(hf_dir)
    model_config = model_config_from_hf(GPTNeoXConfig.from_pretrained(hf_dir))
    hf_model = GPTNeoXForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    state = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in hf_model.state_dict().items()}
    model = GPTNeoX(model_config)
    expected = set(model.state_dict())
    model.load_state_dict({k: v for k, v in state.items() if k in expected})
    config = NeoXConfig(model=model_config)
    tokenizer = hf_dir if (hf_dir / "tokenizer.json").is_file() else None
    return save_checkpoint(model, config, output, tokenizer)


def rng_states() -> dict:
    import random

    import numpy as np

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    import random

    import numpy as np

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def prune_checkpoints(save: Path, keep: int) -> None:
    """Delete all but the `keep` newest global_step<N> checkpoints (the latest is always among them)."""
    tags = sorted((p for p in save.glob("global_step*") if p.name[11:].isdigit()), key=lambda p: int(p.name[11:]))
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_training_checkpoint(engine, config: NeoXConfig, save: Path, step: int, state: dict, tokenizer) -> Path:
    """A DeepSpeed checkpoint of step `step`, with the data position and RNG states, the parsed config and the
    tokenizer; `latest` names it only once every rank has written every file, so a save cut short (even by
    SIGKILL) never becomes the latest and the previous one stays loadable."""
    import torch.distributed as dist

    tag = f"global_step{step}"
    engine.save_checkpoint(str(save), tag=tag, client_state=state, save_latest=False)
    where = save / tag
    rank = dist.get_rank()
    tmp = where / f"rng_state_{rank}.pt.tmp"
    torch.save(rng_states(), tmp)
    tmp.replace(where / f"rng_state_{rank}.pt")
    if rank == 0:
        write_text(where / "config.yml", yaml.safe_dump(to_yaml_dict(config), sort_keys=False))
        if tokenizer is not None:
            copy_tokenizer(Path(tokenizer), where / "tokenizer")
    dist.barrier()
    if rank == 0:
        write_text(save / "latest", tag)
        if config.training.keep_last_n_checkpoints:
            prune_checkpoints(save, config.training.keep_last_n_checkpoints)
    dist.barrier()
    return where


def load_training_checkpoint(engine, load: Path, config: NeoXConfig, layout: tuple, tp_rank: int,
                             pipelined: bool) -> dict:  # fmt: skip
    """Restore this run from `load`'s latest checkpoint: everything when it was saved in the same (TP, PP, DP)
    layout, else weights, step, data position and schedule (trainer/reshard.py). Returns the step and position."""
    import torch.distributed as dist

    from trainer.reshard import checkpoint_layout, load_other_layout

    if not (load / "latest").is_file():
        raise ConfigError(f"--load: {load} holds no 'latest' checkpoint")
    where = checkpoint_dir(load)
    if checkpoint_layout(where)[1] != tuple(layout):
        state = load_other_layout(engine, where, config, tp_rank, pipelined)
        path = where / "mp_rank_00_model_states.pt"
    else:
        path, state = engine.load_checkpoint(str(load))
    if path is None:
        raise ConfigError(f"--load: the checkpoint in {load} could not be read")
    rng = Path(path).parent / f"rng_state_{dist.get_rank()}.pt"
    if not rng.is_file():  # a checkpoint with another layout: keep this run's seeds
        rng = Path(path).parent / "rng_state_0.pt"
    set_rng_states(torch.load(rng, weights_only=False))
    return state
