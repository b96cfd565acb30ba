"""Tensor x pipeline x data parallelism: the model cut by `tensor_parallel.py`, staged by DeepSpeed's PipelineModule.

The order of the steps matters:
1. the topology (pipe, data, model axes, as gpt-neox) and DeepSpeed's grid of process groups over it;
2. the full model, built identically on every rank from the run's seed, then cut for this rank's TP slot;
3. the pipeline's layers, the model's own parts (embed_in, the blocks, final_layer_norm, embed_out), cut by
   `pipe_partition_method` (trainer/layout.py); with TP the loss is the vocab-parallel cross-entropy; with
   packing, each sample's positions and document indices travel beside the hidden states (carry_packing);
4. every parameter counted once in DeepSpeed's gradient norm: it sums over the pipe x model group the parameters
   marked model-parallel plus all of rank 0's, so the TP-replicated ones (LayerNorms, row biases) are marked on
   TP rank 0 of each stage.
"""

import torch
from torch import nn

from trainer.config import NeoXConfig
from trainer.layout import deepspeed_method, pipeline_parts
from trainer.model import IGNORED, GPTNeoX, lm_loss
from trainer.tensor_parallel import apply_tensor_parallel, vocab_parallel_cross_entropy


class LMLoss:
    """(logits, targets) -> mean next-token loss in fp32; vocab-parallel when the logits are split by TP. `masked`:
    IGNORED targets (eod_mask_loss) count for nothing."""

    def __init__(self, group=None, rank: int = 0, world: int = 1, masked: bool = False):
        self.group, self.rank, self.world, self.masked = group, rank, world, masked

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return lm_loss(logits, targets, masked=self.masked)
        start = self.rank * logits.shape[-1]
        if not self.masked:
            return vocab_parallel_cross_entropy(logits, targets, self.group, start).mean()
        kept = targets != IGNORED
        losses = vocab_parallel_cross_entropy(logits, targets.masked_fill(~kept, 0), self.group, start)
        return (losses * kept).sum() / kept.sum()


def carry_packing(layers: list[nn.Module], positions: bool, documents: bool) -> None:
    """With packing (TrainingConfig.packing), the pipeline's activations are (hidden, positions, documents): the
    embedding takes (ids, positions, documents) and passes the two on, each block reads those the run asked for
    and passes both on, the final LayerNorm drops them. Hooks on the model's own modules: the layers, and their
    state dicts, stay the model's."""
    embed, blocks, final = layers[0], layers[1:-2], layers[-2]

    def take(module, args):  # (x, positions, documents) -> x, the two kept for the module's output
        x, *module.carried = args[0]
        return (x,)

    def give(module, args, output):
        return (output, *module.carried)

    def read(module, args, kwargs):  # a block: the two as its keyword arguments
        x, *module.carried = args[0]
        p, d = module.carried
        return (x,), {**kwargs, "positions": p if positions else None, "documents": d if documents else None}

    embed.register_forward_pre_hook(take)
    embed.register_forward_hook(give)
    for block in blocks:
        block.register_forward_pre_hook(read, with_kwargs=True)
        block.register_forward_hook(give)
    final.register_forward_pre_hook(lambda module, args: (args[0][0],))


def make_topology(config: NeoXConfig, world_size: int):
    """DeepSpeed's topology of the run: axes pipe, data, model (the model axis fastest, as gpt-neox)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    p = config.parallel
    return PipeModelDataParallelTopology(
        num_pp=p.pipe_parallel_size, num_mp=p.model_parallel_size, num_dp=config.data_parallel_size(world_size)
    )


def build_pipeline(config: NeoXConfig, world_size: int):
    """(PipelineModule for this rank, its grid): the model's parts, cut for TP and staged for PP."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid

    topo = make_topology(config, world_size)
    grid = PipelineParallelGrid(topology=topo)
    tp_group, tp_rank = grid.get_slice_parallel_group(), grid.get_slice_parallel_rank()
    tp = config.parallel.model_parallel_size
    torch.manual_seed(config.training.seed)
    model = GPTNeoX(config.model)
    if tp > 1:
        apply_tensor_parallel(model, tp_group, tp_rank, tp)
    for param in model.parameters():  # see 4. above
        param.model_parallel = getattr(param, "tensor_model_parallel", False) or tp_rank == 0
    layers = [model.get_submodule(path) for _, path in pipeline_parts(config.model.num_layers)]
    t = config.training
    if t.packing:
        carry_packing(layers, t.reset_position_ids, t.reset_attention_mask)
    interval = 1 if config.model.checkpoint_activations else 0
    module = PipelineModule(
        layers=layers,
        loss_fn=LMLoss(tp_group, tp_rank, tp, t.eod_mask_loss),
        topology=topo,
        partition_method=deepspeed_method(config),
        activation_checkpoint_interval=interval,
    )
    return module, grid
