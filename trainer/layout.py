"""The parallel layout of a run, computed without a process group or a model: `train --dry-run`.

Ranks are laid out as DeepSpeed's PipeModelDataParallelTopology lays them out (axes pipe, data, model, the model
axis fastest, as gpt-neox), so TP peers are neighbours on a node. The pipeline's layers are the model's own parts:
    0 embed_in | 1 .. L blocks | L+1 final_layer_norm | L+2 embed_out
cut into stages with DeepSpeed's own partitioner, as PipelineModule cuts them for `pipe_partition_method`
(`type:transformer`, gpt-neox's default: blocks balanced; `parameters`; `uniform`), so what is printed here is
what the pipeline engine will build.
"""

import os
from dataclasses import dataclass

from trainer.config import NeoXConfig


@dataclass
class Stage:
    """One pipeline stage: its layers, its blocks and its parameters on each TP rank."""

    first_layer: int
    last_layer: int  # inclusive
    blocks: list[int]
    parameters_per_rank: int  # on each TP rank of the stage


def block_parameters(h: int, ffn: int) -> int:
    """Two LayerNorms, QKV, attention output, and the MLP's two projections, with biases."""
    return 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * ffn + ffn) + (ffn * h + h)


def pipeline_parts(num_layers: int) -> list[tuple[str, str]]:
    """The pipeline's layers in order, as (name, the model's submodule): the one list that the pipeline, the dry
    run, plan and resharding all read."""
    blocks = [(f"block {i}", f"gpt_neox.layers.{i}") for i in range(num_layers)]
    return [
        ("embed_in", "gpt_neox.embed_in"),
        *blocks,
        ("final_layer_norm", "gpt_neox.final_layer_norm"),
        ("embed_out", "embed_out"),
    ]


def layer_names(num_layers: int) -> list[str]:
    """The pipeline's layer names in order."""
    return [name for name, _ in pipeline_parts(num_layers)]


def deepspeed_method(config: NeoXConfig) -> str:
    """PipelineModule's partition_method for the config's pipe_partition_method ("type:..." balances blocks)."""
    method = config.parallel.pipe_partition_method
    return "type:Block" if method.startswith("type:") else method


def stage_bounds(config: NeoXConfig) -> list[int]:
    """Layer index where each stage starts (and the end), computed as PipelineModule computes it."""
    names, stages = layer_names(config.model.num_layers), config.parallel.pipe_parallel_size
    if stages == 1:
        return [0, len(names)]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # a dry run needs no accelerator: skip DeepSpeed's probe
    from deepspeed.runtime.utils import partition_balanced, partition_uniform

    method = deepspeed_method(config)
    if method == "uniform":
        return [int(b) for b in partition_uniform(num_items=len(names), num_parts=stages)]
    if method == "parameters":
        weights = [layer_parameters(config, n) for n in names]
    else:
        weights = [int(n.startswith("block")) for n in names]
    return [int(b) for b in partition_balanced(weights=weights, num_parts=stages)]


def layer_parameters(config: NeoXConfig, name: str) -> int:
    """Parameters of one layer on one TP rank: split matrices divided by TP, LayerNorms and row biases whole."""
    m, t = config.model, config.parallel.model_parallel_size
    h, ffn, vocab = m.hidden_size, m.intermediate_size, m.padded_vocab_size
    if name in ("embed_in", "embed_out"):
        return vocab * h // t
    if name == "final_layer_norm":
        return 2 * h
    replicated = 4 * h + 2 * h  # two LayerNorms, the two row-parallel biases
    return (block_parameters(h, ffn) - replicated) // t + replicated


def pipeline_stages(config: NeoXConfig) -> list[Stage]:
    """The pipeline's stages: their layers, blocks and parameters on each TP rank (what plan and the dry run print)."""
    names = layer_names(config.model.num_layers)
    bounds = stage_bounds(config)
    out = []
    for start, end in zip(bounds, bounds[1:]):
        blocks = [int(n.split()[1]) for n in names[start:end] if n.startswith("block")]
        out.append(Stage(start, end - 1, blocks, sum(layer_parameters(config, n) for n in names[start:end])))
    return out
