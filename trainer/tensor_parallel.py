"""Megatron-style tensor parallelism, applied to the model from outside (the model knows nothing of it).

A small plan says how each projection is cut across the `t` ranks of a TP group:
    column   out features split (QKV, dense_h_to_4h, the output layer): input copied, output stays split
    row      in features split (attention.dense, dense_4h_to_h): one all-reduce of the output, then the bias once
    vocab    embedding rows split by token id: each rank looks up its ids, one all-reduce
QKV's rows are laid out per head as [q|k|v], so a contiguous cut is a cut by heads. LayerNorms and the row
layers' biases are replicated: every TP rank computes them from the same all-reduced input, so their gradients
are equal and they stay in sync without communication. The loss is a vocab-parallel cross-entropy in fp32 on the
split logits (never gathered). Sharded parameters carry `tensor_model_parallel = True` and `partition_dim`, which
DeepSpeed reads to count each gradient once in the global norm.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trainer.model import GPTNeoX

TP_PLAN = {
    "attention.query_key_value": "column",
    "attention.dense": "row",
    "mlp.dense_h_to_4h": "column",
    "mlp.dense_4h_to_h": "row",
}
# How a full checkpoint tensor is cut, by key suffix: the dimension, or None for replicated.
PARTITION_DIM = {
    "attention.query_key_value.weight": 0,
    "attention.query_key_value.bias": 0,
    "attention.dense.weight": 1,
    "mlp.dense_h_to_4h.weight": 0,
    "mlp.dense_h_to_4h.bias": 0,
    "mlp.dense_4h_to_h.weight": 1,
    "embed_in.weight": 0,
    "embed_out.weight": 0,
}


def partition_dim(key: str) -> int | None:
    """The dimension along which a full state dict's tensor is split across TP ranks, or None if replicated."""
    return next((d for suffix, d in PARTITION_DIM.items() if key.endswith(suffix)), None)


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward (Megatron's f)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """All-reduce forward; identity backward (Megatron's g)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def shard(tensor: torch.Tensor, dim: int, rank: int, world: int) -> nn.Parameter:
    """This rank's slice of `tensor` along `dim`, as a parameter marked tensor-parallel."""
    piece = nn.Parameter(tensor.detach().chunk(world, dim=dim)[rank].clone())
    piece.tensor_model_parallel, piece.partition_dim = True, dim
    return piece


class ColumnParallelLinear(nn.Module):
    """A Linear whose output features are split across TP ranks (Megatron's column parallel)."""

    def __init__(self, full: nn.Linear, group, rank: int, world: int):
        super().__init__()
        self.group = group
        self.weight = shard(full.weight, 0, rank, world)
        self.bias = shard(full.bias, 0, rank, world) if full.bias is not None else None

    def forward(self, x):
        return F.linear(_CopyToGroup.apply(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """A Linear whose input features are split across TP ranks; the outputs are summed (Megatron's row parallel)."""

    def __init__(self, full: nn.Linear, group, rank: int, world: int):
        super().__init__()
        self.group = group
        self.weight = shard(full.weight, 1, rank, world)
        self.bias = nn.Parameter(full.bias.detach().clone()) if full.bias is not None else None

    def forward(self, x):
        out = _ReduceFromGroup.apply(F.linear(x, self.weight), self.group)
        return out + self.bias if self.bias is not None else out


class VocabParallelEmbedding(nn.Module):
    """An Embedding whose rows (the vocabulary) are split across TP ranks."""

    def __init__(self, full: nn.Embedding, group, rank: int, world: int):
        super().__init__()
        self.group = group
        self.weight = shard(full.weight, 0, rank, world)
        self.start = rank * self.weight.shape[0]

    def forward(self, ids):
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return _ReduceFromGroup.apply(out.masked_fill(outside.unsqueeze(-1), 0.0), self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of logits split by vocabulary across `group`, in fp32, without gathering them."""

    @staticmethod
    def forward(ctx, logits, targets, group, start):
        logits = logits.float() if logits.element_size() < 4 else logits.clone()  # fp16/bf16 up to fp32
        top = logits.max(dim=-1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        logits = logits - top.unsqueeze(-1)
        local = targets - start
        outside = (local < 0) | (local >= logits.shape[-1])
        local = local.masked_fill(outside, 0)
        picked = logits.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = logits.exp()
        total = exp.sum(dim=-1)
        dist.all_reduce(picked, group=group)
        dist.all_reduce(total, group=group)
        ctx.save_for_backward(exp.div_(total.unsqueeze(-1)), local, outside)
        return total.log() - picked

    @staticmethod
    def backward(ctx, grad):
        softmax, local, outside = ctx.saved_tensors
        grad_logits = softmax.clone()
        grad_logits.scatter_add_(-1, local.unsqueeze(-1), -(~outside).to(grad_logits.dtype).unsqueeze(-1))
        return grad_logits * grad.unsqueeze(-1), None, None, None


def vocab_parallel_cross_entropy(logits, targets, group, start: int) -> torch.Tensor:
    """Per-token losses (batch, seq) from this rank's slice of the logits, starting at vocabulary id `start`."""
    return _VocabParallelCrossEntropy.apply(logits, targets, group, start)


def apply_tensor_parallel(model: GPTNeoX, group, rank: int, world: int) -> GPTNeoX:
    """Cut `model` in place for rank `rank` of a TP group of `world` (from the full, identically seeded model)."""
    c = model.config
    if c.num_attention_heads % world or c.padded_vocab_size % world or c.intermediate_size % world:
        raise ValueError(f"tensor parallel size {world} must divide the heads, the padded vocabulary and the MLP")
    layouts = {"column": ColumnParallelLinear, "row": RowParallelLinear}
    for block in model.gpt_neox.layers:
        for path, layout in TP_PLAN.items():
            parent_name, name = path.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, name, layouts[layout](getattr(parent, name), group, rank, world))
    model.gpt_neox.embed_in = VocabParallelEmbedding(model.gpt_neox.embed_in, group, rank, world)
    model.embed_out = ColumnParallelLinear(model.embed_out, group, rank, world)
    return model
