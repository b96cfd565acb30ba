"""Tensor x pipeline x data parallelism: the model cut by `tensor_parallel.py`, staged by DeepSpeed's PipelineModule.

The order of the steps matters:
1. the topology (pipe, data, model axes, as gpt-neox) and DeepSpeed's grid of process groups over it;
2. the full model, built identically on every rank from the run's seed, then cut for this rank's TP slot;
3. the pipeline's layers, the model's own parts (embed_in, the blocks, final_layer_norm, embed_out), cut by
   `pipe_partition_method` (trainer/layout.py); with TP the loss is the vocab-parallel cross-entropy;
4. every parameter counted once in DeepSpeed's gradient norm: it sums over the pipe x model group the parameters
   marked model-parallel plus all of rank 0's, so the TP-replicated ones (LayerNorms, row biases) are marked on
   TP rank 0 of each stage.
"""

import torch

from trainer.config import NeoXConfig
from trainer.layout import deepspeed_method, pipeline_parts
from trainer.model import GPTNeoX, lm_loss
from trainer.tensor_parallel import apply_tensor_parallel, vocab_parallel_cross_entropy


class LMLoss:
    """(logits, targets) -> mean next-token loss in fp32; vocab-parallel when the logits are split by TP."""

    def __init__(self, group=None, rank: int = 0, world: int = 1):
        self.group, self.rank, self.world = group, rank, world

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return lm_loss(logits, targets)
        start = self.rank * logits.shape[-1]
        return vocab_parallel_cross_entropy(logits, targets, self.group, start).mean()


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
    interval = 1 if config.model.checkpoint_activations else 0
    module = PipelineModule(
        layers=layers,
        loss_fn=LMLoss(tp_group, tp_rank, tp),
        topology=topo,
        partition_method=deepspeed_method(config),
        activation_checkpoint_interval=interval,
    )
    return module, grid
