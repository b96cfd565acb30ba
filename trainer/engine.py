"""DeepSpeed set-up from the parsed config: the process group, the generated DeepSpeed config, AdamW with
parameter groups, and the learning-rate schedule. Nothing here is kept by hand beside the YAML config."""

import math
import os
import socket
import warnings
from datetime import timedelta

import torch
from torch import nn

from trainer.config import NeoXConfig, OptimizerConfig


def free_port() -> int:
    """A TCP port free on this host, for a one-process run's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: float = 30.0):
    """Join (or, run alone, create) the process group, its collectives waiting at most `timeout_minutes` for a
    peer; returns the deepspeed module.

    The deepspeed launcher, torchrun and Slurm wrappers set RANK/WORLD_SIZE/...; a plain `neox-data train` is
    one process, given those variables here so DeepSpeed does not look for MPI.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # DeepSpeed's collectives call it, torch 2.13 deprecates it: a line from every rank that no user can act on
    warnings.filterwarnings("ignore", message="`torch.distributed.all_gather_into_tensor` is deprecated")
    # the shared-memory op serves inference only; compiling it costs ~60 s at every CPU start
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timedelta(minutes=timeout_minutes))
    return deepspeed


def plain_fp32(config: NeoXConfig) -> bool:
    """fp32 without ZeRO: DeepSpeed steps the torch optimizer directly, and the trainer clips (keeping the norm,
    which DeepSpeed's fp32 path computes and drops)."""
    p = config.parallel  # the pipeline engine clips with its grid
    return p.zero_stage == 0 and not config.precision.mixed and not p.pipelined


def keep_clip_norm(engine) -> None:
    """DeepSpeed's fp32 path without ZeRO (the pipeline's: see plain_fp32 for the rest) clips with the engine's
    grid and drops the norm it computed; keep it, so get_global_grad_norm() returns it for the log and the nan check."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip():
        norm = clip_grad_norm_(
            parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(), mpu=engine.mpu
        )
        engine._global_grad_norm = norm

    engine.clip_fp32_gradients = clip


def deepspeed_config(config: NeoXConfig, world_size: int) -> dict:
    """The DeepSpeed JSON, generated from the dataclasses (never kept by hand beside them)."""
    t, p, pr = config.training, config.parallel, config.precision
    out = {
        "train_batch_size": config.global_batch(world_size),
        "train_micro_batch_size_per_gpu": t.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": 0.0 if plain_fp32(config) else config.optimizer.gradient_clipping,
        "zero_optimization": {"stage": p.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: no JIT-compiled FusedAdam
        "steps_per_print": 2**31 - 1,  # we log
        "wall_clock_breakdown": False,
    }
    return {**out, **pr.blocks()}


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weight matrices and embeddings; none on biases and LayerNorms (as gpt-neox)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            (no_decay if isinstance(module, nn.LayerNorm) or name == "bias" else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, o: OptimizerConfig, fp16: bool) -> torch.optim.Optimizer:
    """torch's AdamW with gpt-neox's parameter groups: fused (one kernel over all tensors, CPU and CUDA), except
    with fp16, which keeps the path measured on a GPU."""
    return torch.optim.AdamW(
        parameter_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps, fused=None if fp16 else True
    )


def learning_rate(o: OptimizerConfig, step: int) -> float:
    """The rate of optimizer step `step` (0-based): linear warmup, then cosine (or linear) decay to min_lr."""
    warmup = int(o.warmup * o.lr_decay_iters)
    if step < warmup:
        return o.lr * (step + 1) / warmup
    if o.lr_decay_style == "constant":
        return o.lr
    done = min(1.0, (step - warmup) / max(1, o.lr_decay_iters - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * done)) if o.lr_decay_style == "cosine" else 1 - done
    return o.min_lr + (o.lr - o.min_lr) * shape


def make_scheduler(optimizer: torch.optim.Optimizer, o: OptimizerConfig):
    """The learning_rate() schedule as a torch LambdaLR (DeepSpeed steps it with the optimizer)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate(o, step) / o.lr if o.lr else 0.0)
