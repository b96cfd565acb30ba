"""neox-data plan: parameters, memory per GPU for the configured layout, FLOPs, time and GPU-hours.

Formulas (bytes per parameter, FLOPs per step, activations per layer) are the standard ones:
- mixed precision (fp16/bf16): 2 weights + 2 gradients + 12 optimizer (fp32 master, Adam m and v);
  fp32: 4 + 4 + 8. ZeRO stage 1 divides the optimizer states by DP, stage 2 also the gradients, 3 also weights.
- model FLOPs per step, Narayanan et al. (2021): 72 B s L h^2 (1 + s / 6h + V / 12hL); activation checkpointing
  recomputes the forward pass: 96 instead of 72 for the transformer part.
- activations per layer and micro-batch, Korthikanti et al. (2022), with TP t and the attention matrix not stored
  (scaled_dot_product_attention): s b h (10 + 24 / t) bytes at 2 bytes per value; with checkpointing 2 s b h
  (the block's input) plus one block recomputed at a time. 1F1B keeps up to PP micro-batches in flight.
- a checkpoint, all ranks' files: DeepSpeed's (the weights in the training precision and Adam's fp32 states: 14
  bytes a parameter mixed, 12 in fp32) and the universal copy (fp32 value and two moments: 12), saved at the steps
  the schedule names (save_interval or checkpoint_factor, linear or log, extra_save_iters) and the last.
"""

import os
from dataclasses import asdict, dataclass

from trainer.config import NeoXConfig
from trainer.layout import block_parameters, layer_names, pipeline_stages


@dataclass
class Plan:
    """What `neox-data plan` reports for a config and a GPU count."""

    parameters: int
    non_embedding_parameters: int
    padded_vocab_size: int
    layout: dict
    blocks_per_stage: list[int]
    parameters_per_gpu: int
    memory_gib: dict
    tokens_per_step: int
    model_flops_per_step: float
    hardware_flops_per_step: float
    tflops_per_gpu: float
    days: float
    gpu_hours: float
    total_tokens: float
    checkpoint_bytes: dict
    checkpoints: int
    checkpoints_on_disk: int
    document_mask_mib: float  # with reset_attention_mask: each attention call's mask (0 without)


def count_parameters(config: NeoXConfig) -> tuple[int, int]:
    """(total, without the input and output embeddings)."""
    m = config.model
    blocks = m.num_layers * block_parameters(m.hidden_size, m.intermediate_size)
    return blocks + 2 * m.padded_vocab_size * m.hidden_size + 2 * m.hidden_size, blocks + 2 * m.hidden_size


def memory_per_gpu(config: NeoXConfig, params_per_gpu: int, blocks: int, dp: int) -> dict:
    """GiB per GPU of the most loaded stage, by kind."""
    mixed = config.precision.fp16 or config.precision.bf16
    weight, grad, optim = (2, 2, 12) if mixed else (4, 4, 8)
    zero = config.parallel.zero_stage
    m, t = config.model, config.training
    tp, pp = config.parallel.model_parallel_size, config.parallel.pipe_parallel_size
    sbh = t.seq_length * t.train_micro_batch_size_per_gpu * m.hidden_size
    full_layer = sbh * (10 + 24 / tp)
    in_flight = min(pp, t.gradient_accumulation_steps)
    logits = t.seq_length * t.train_micro_batch_size_per_gpu * m.padded_vocab_size / tp * 4
    gib = 2**30
    out = {
        "weights": params_per_gpu * weight / (dp if zero >= 3 else 1) / gib,
        "gradients": params_per_gpu * grad / (dp if zero >= 2 else 1) / gib,
        "optimizer_states": params_per_gpu * optim / (dp if zero >= 1 else 1) / gib,
        "activations_without_checkpointing": (blocks * full_layer * in_flight + logits) / gib,
        "activations_with_checkpointing": (blocks * 2 * sbh * in_flight + full_layer + logits) / gib,
    }
    chosen = "activations_with_checkpointing" if m.checkpoint_activations else "activations_without_checkpointing"
    out["total"] = out["weights"] + out["gradients"] + out["optimizer_states"] + out[chosen]
    return out


def step_flops(config: NeoXConfig, global_batch: int) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs with recomputation) of one optimizer step."""
    m, s = config.model, config.training.seq_length
    h, layers, vocab = m.hidden_size, m.num_layers, m.padded_vocab_size
    transformer = global_batch * s * layers * h * h * (1 + s / (6 * h))
    head = global_batch * s * layers * h * h * vocab / (12 * h * layers)
    recompute = 96 if m.checkpoint_activations else 72
    return 72 * (transformer + head), recompute * transformer + 72 * head


def checkpoint_bytes(config: NeoXConfig, parameters: int) -> dict:
    """Bytes of one checkpoint, all ranks' files together, by part (see the module's notes)."""
    return {
        "deepspeed": parameters * (14 if config.precision.mixed else 12),
        "universal": parameters * 12 if config.training.universal_checkpoint else 0,
    }


def saved_steps(config: NeoXConfig) -> list[int]:
    """The steps a run from step 0 saves: its schedule's, and the last."""
    t = config.training
    return [s for s in range(t.train_iters + 1) if t.saves_at(s) or s == t.train_iters]


def make_plan(config: NeoXConfig, gpus: int | None = None, tflops: float = 117.0) -> Plan:
    """Parameters, layout, memory per GPU, FLOPs and time of a run on `gpus` GPUs at `tflops` each."""
    p = config.parallel
    gpus = gpus or p.model_parallel_size * p.pipe_parallel_size
    dp = config.data_parallel_size(gpus)
    total, non_embedding = count_parameters(config)
    cut = pipeline_stages(config)  # DeepSpeed's partition, as the pipeline and the dry run cut it
    heaviest = max(cut, key=lambda s: s.parameters_per_rank)
    per_gpu = heaviest.parameters_per_rank
    batch = config.global_batch(gpus)
    model_flops, hardware_flops = step_flops(config, batch)
    seconds = hardware_flops * config.training.train_iters / (gpus * tflops * 1e12)
    saved, keep = saved_steps(config), config.training.keep_last_n_checkpoints
    return Plan(
        parameters=total,
        non_embedding_parameters=non_embedding,
        padded_vocab_size=config.model.padded_vocab_size,
        layout={
            "gpus": gpus,
            "tensor_parallel": p.model_parallel_size,
            "pipeline_parallel": p.pipe_parallel_size,
            "data_parallel": dp,
            "zero_stage": p.zero_stage,
            "global_batch": batch,
        },
        blocks_per_stage=[len(s.blocks) for s in cut],
        parameters_per_gpu=per_gpu,
        memory_gib=memory_per_gpu(config, per_gpu, len(heaviest.blocks), dp),
        tokens_per_step=batch * config.training.seq_length,
        model_flops_per_step=model_flops,
        hardware_flops_per_step=hardware_flops,
        tflops_per_gpu=tflops,
        days=seconds / 86400,
        gpu_hours=seconds * gpus / 3600,
        total_tokens=float(batch * config.training.seq_length * config.training.train_iters),
        checkpoint_bytes=checkpoint_bytes(config, total),
        checkpoints=len(saved),
        checkpoints_on_disk=min(len(saved), keep + 1) if keep else len(saved),  # a new one is written, then pruning
        document_mask_mib=document_mask_mib(config),
    )


def document_mask_mib(config: NeoXConfig) -> float:
    """MiB of the attention mask each layer builds when documents are masked from each other: (micro, seq, seq)
    booleans, made and dropped per attention call."""
    t = config.training
    return t.train_micro_batch_size_per_gpu * t.seq_length**2 / 2**20 if t.reset_attention_mask else 0.0


def in_units(n: float, units: tuple, below: str) -> str:
    """`n` with one decimal in the largest of `units` ((scale, suffix), largest first) it reaches; `below` formats
    a smaller one."""
    for scale, suffix in units:
        if n >= scale:
            return f"{n / scale:,.1f}{suffix}"
    return below.format(n)


def tokens(n: float) -> str:
    """A token count as people say it: 471.9B, 1.2M, 4,096."""
    return in_units(n, ((1e9, "B"), (1e6, "M"), (1e3, "K")), "{:,.0f}")


def duration(days: float) -> str:
    """A wall time in the unit that reads best: days, hours, minutes or seconds."""
    seconds = days * 86400
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:,.1f} seconds"


def gb(n: float) -> str:
    """Bytes as disks count them: 321.3 MB, 533.1 GB, 160.0 TB."""
    return in_units(n, ((1e12, " TB"), (1e9, " GB"), (1e6, " MB"), (1e3, " KB")), "{:,.0f} bytes")


def describe_checkpoints(plan: Plan) -> str:
    """The checkpoints line: how many, how large, and the disk they hold at most."""
    size = sum(plan.checkpoint_bytes.values())
    parts = f"DeepSpeed's files {gb(plan.checkpoint_bytes['deepspeed'])}"
    if plan.checkpoint_bytes["universal"]:
        parts += f" + universal copy {gb(plan.checkpoint_bytes['universal'])}"
    kept = "all kept" if plan.checkpoints_on_disk == plan.checkpoints else f"at most {plan.checkpoints_on_disk} on disk"
    return (
        f"checkpoints         {plan.checkpoints:,} saved, {gb(size)} each ({parts}); {kept}: "
        f"{gb(size * plan.checkpoints_on_disk)}"
    )


def describe(plan: Plan) -> str:
    """The plan as `neox-data plan` prints it."""
    lay, mem = plan.layout, plan.memory_gib
    lines = [
        f"parameters          {plan.parameters:,} ({plan.non_embedding_parameters:,} without embeddings)",
        f"padded vocabulary   {plan.padded_vocab_size:,}",
        f"layout              {lay['gpus']} GPU{'s' * (lay['gpus'] > 1)} = TP {lay['tensor_parallel']} x "
        f"PP {lay['pipeline_parallel']} x DP {lay['data_parallel']}, ZeRO stage {lay['zero_stage']}",
        f"blocks per stage    {', '.join(map(str, plan.blocks_per_stage))}",
        f"global batch        {lay['global_batch']:,} sequences, {plan.tokens_per_step:,} tokens a step",
        f"parameters per GPU  {plan.parameters_per_gpu:,} (the most loaded stage)",
        "memory per GPU, GiB " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in mem.items()),
        f"FLOPs per step      {plan.model_flops_per_step:.3e} model, "
        f"{plan.hardware_flops_per_step:.3e} with recomputation",
        f"run                 {tokens(plan.total_tokens)} tokens: {duration(plan.days)}, "
        f"{plan.gpu_hours:,.{0 if plan.gpu_hours >= 10 else 2}f} GPU-hours at {plan.tflops_per_gpu:g} TFLOPS per GPU",
        describe_checkpoints(plan),
    ]
    if plan.document_mask_mib:
        lines.append(
            f"documents           masked from each other: a {plan.document_mask_mib:,.0f} MiB mask per attention "
            "call; attention still computes every score (the FLOPs above stand; tokens/s: benchmarks/train.py "
            "--doc-mask)"
        )
    return "\n".join(lines)


def as_dict(plan: Plan) -> dict:
    """The plan as JSON-ready data (--json)."""
    return asdict(plan)


def describe_layout(config: NeoXConfig, world_size: int) -> str:
    """What --dry-run prints: the topology, the stages and the parameters per rank."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    p = config.parallel
    dp = config.data_parallel_size(world_size)
    topology = PipeModelDataParallelTopology(num_pp=p.pipe_parallel_size, num_mp=p.model_parallel_size, num_dp=dp)
    names = layer_names(config.model.num_layers)
    lines = [
        f"layout      {world_size} ranks = PP {p.pipe_parallel_size} x DP {dp} x TP {p.model_parallel_size} "
        f"(rank order pipe, data, model), ZeRO stage {p.zero_stage}, global batch "
        f"{config.global_batch(world_size):,}"
    ]
    for i, s in enumerate(pipeline_stages(config)):
        blocks = f"blocks {s.blocks[0]}-{s.blocks[-1]} ({len(s.blocks)} blocks)" if s.blocks else "no blocks"
        extras = [n for n in names[s.first_layer : s.last_layer + 1] if not n.startswith("block")]
        extras = f" + {', '.join(extras)}" if extras else ""
        lines.append(
            f"stage {i:<4}  layers {s.first_layer}-{s.last_layer}: {blocks}{extras}; "
            f"{s.parameters_per_rank:,} parameters per rank"
        )
    shown = min(world_size, 2 * p.model_parallel_size + 1)
    ranks = ", ".join(f"{r}={tuple(topology.get_coord(r))}" for r in range(shown))
    lines.append(f"ranks       (pipe, data, model): {ranks}, ...")
    mem = make_plan(config, world_size).memory_gib  # the same figures as plan's
    lines.append(
        "memory      per GPU of the most loaded stage, GiB: "
        + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in mem.items())
    )
    return "\n".join(lines)
