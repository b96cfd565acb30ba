"""GPT-NeoX, as gpt-neox trains it for GPT-NeoX-20B. Torch only: it knows nothing of DeepSpeed or parallelism.

Module names are Hugging Face's GPT-NeoX checkpoint keys (`gpt_neox.layers.N.attention.query_key_value`, ...,
`embed_out`), so converting either way is a rename. The parts a pipeline needs stand apart: `gpt_neox.embed_in`,
the blocks in `gpt_neox.layers`, `gpt_neox.final_layer_norm` and `embed_out`.
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def check_at_least(obj, minimum: int, *names: str) -> None:
    """A ValueError naming the first field of `obj` below `minimum` (None means unset and passes)."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < minimum:
            raise ValueError(f"{name}: must be at least {minimum}, got {value}")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture. `padded_vocab_size` is derived; everything else is gpt-neox's meaning of the name."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    vocab_size: int = 50277
    max_position_embeddings: int = 2048
    rotary_pct: float = 0.25
    rotary_emb_base: int = 10000
    gpt_j_residual: bool = True  # the parallel residual x + attn(ln1(x)) + mlp(ln2(x)), as GPT-NeoX-20B trained
    intermediate_size: int = 0  # 0: 4 x hidden_size
    layernorm_epsilon: float = 1e-5
    gelu_approximate: str = "tanh"  # gpt-neox's fused bias-GELU is the tanh form; "none" is the exact erf form
    make_vocab_size_divisible_by: int = 128
    padded_vocab_size: int = 0  # 0: vocab_size rounded up to that multiple (the config passes the TP-aware size)
    init_method: str = "small_init"
    output_layer_init_method: str = "wang_init"
    checkpoint_activations: bool = False

    def __post_init__(self):
        check_at_least(
            self,
            1,
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "vocab_size",
            "max_position_embeddings",
            "make_vocab_size_divisible_by",
        )
        check_at_least(self, 0, "intermediate_size")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        object.__setattr__(self, "intermediate_size", self.intermediate_size or 4 * self.hidden_size)
        if self.padded_vocab_size < self.vocab_size:
            multiple = self.make_vocab_size_divisible_by
            object.__setattr__(self, "padded_vocab_size", math.ceil(self.vocab_size / multiple) * multiple)

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dims(self) -> int:
        """Channels of each head that rotary embeddings rotate (rotary_pct of head_dim)."""
        return int(self.head_dim * self.rotary_pct)


def init_std(name: str, config: ModelConfig) -> float:
    """gpt-neox's init methods: small_init N(0, sqrt(2/(5d))); wang_init N(0, 2/(L sqrt(d)))."""
    d, layers = config.hidden_size, config.num_layers
    stds = {"small_init": math.sqrt(2 / (5 * d)), "wang_init": 2 / (layers * math.sqrt(d)), "normal": 0.02}
    if name not in stds:
        raise ValueError(f"unknown init method {name!r}; choose from {', '.join(stds)}")
    return stds[name]


class Rotary(nn.Module):
    """Rotary embeddings on the first `dims` of each head, half-split (GPT-NeoX style, not interleaved)."""

    def __init__(self, dims: int, base: int):
        super().__init__()
        self.dims = dims
        self.register_buffer(
            "inv_freq", 1.0 / base ** (torch.arange(0, dims, 2, dtype=torch.float32) / dims), persistent=False
        )

    def forward(self, q, k, offset: int = 0, positions: torch.Tensor | None = None):
        # q, k: (batch, heads, seq, head_dim); cos/sin in fp32. `positions` (batch, seq): each token's own position
        # (restarting at each document), else offset, offset + 1, ... for every sample
        if positions is None:
            steps = torch.arange(offset, offset + q.shape[2], device=q.device, dtype=torch.float32)
            freqs = torch.outer(steps, self.inv_freq.to(q.device))  # (seq, dims / 2)
        else:
            freqs = (positions.float().unsqueeze(-1) * self.inv_freq.to(q.device)).unsqueeze(
                1
            )  # (batch, 1, seq, dims/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x, cos, sin):
        rot, keep = x[..., : self.dims], x[..., self.dims :]
        x1, x2 = rot.float().chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return torch.cat(((rot.float() * cos + rotated * sin).to(x.dtype), keep), dim=-1)


class Attention(nn.Module):
    """Causal self-attention with a fused QKV projection and rotary position embeddings on part of each head.

    The heads are counted from the QKV weight, so a tensor-parallel slice of it (a cut by heads) computes its own
    heads with no other change."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.rotary = Rotary(config.rotary_dims, config.rotary_emb_base)

    def forward(self, x, cache=None, positions=None, documents=None):
        b, s, _ = x.shape
        heads = self.query_key_value.weight.shape[0] // (3 * self.head_dim)
        # fused QKV laid out per head as [q|k|v]: (batch, seq, heads, 3 * head_dim) -> 3 x (batch, heads, seq, head_dim)
        q, k, v = self.query_key_value(x).view(b, s, heads, 3 * self.head_dim).transpose(1, 2).chunk(3, dim=-1)
        offset = cache.length if cache is not None else 0
        q, k = self.rotary(q, k, offset, positions)
        if cache is not None:
            k, v = cache.update(self, k, v)
        if documents is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=offset == 0 and s > 1)
        else:  # each token sees the tokens before it in its own document only
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(documents))
        return self.dense(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    """hidden -> intermediate -> GELU -> hidden."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.approximate = config.gelu_approximate

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.approximate))


class Block(nn.Module):
    """One transformer layer: attention and MLP, each after its own LayerNorm, on a parallel (GPT-J) or
    sequential residual."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = Attention(config)
        self.mlp = MLP(config)
        self.parallel_residual = config.gpt_j_residual

    def forward(self, x, cache=None, positions=None, documents=None):
        attend = functools.partial(self.attention, cache=cache, positions=positions, documents=documents)
        if self.parallel_residual:  # two untied LayerNorms, both on the block's input: the paper's "oversight", kept
            return x + attend(self.input_layernorm(x)) + self.mlp(self.post_attention_layernorm(x))
        x = x + attend(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Trunk(nn.Module):
    """HF's `gpt_neox` submodule: embedding, blocks, final LayerNorm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_in = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class GPTNeoX(nn.Module):
    """GPT-NeoX in plain torch, with Hugging Face's GPTNeoXForCausalLM's module names (so export is a rename): the
    trunk (`gpt_neox`) and an untied output projection (`embed_out`). It knows nothing of parallelism: tensor
    parallelism, pipelining, compilation and activation checkpointing are applied from outside."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.gpt_neox = Trunk(config)
        self.embed_out = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """small_init for every weight, wang_init for the two output projections of each block, zero biases."""
        c = self.config
        std, out_std = init_std(c.init_method, c), init_std(c.output_layer_init_method, c)
        for name, module in self.named_modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                projection = name.endswith(("attention.dense", "mlp.dense_4h_to_h"))
                nn.init.normal_(module.weight, 0.0, out_std if projection else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor, cache=None, positions=None, documents=None) -> torch.Tensor:
        """Logits (batch, seq, padded_vocab) for token ids (batch, seq); `cache` continues a KVCache. A sample that
        packs several documents may give each token its rotary position within its document (`positions`) and
        its document's index (`documents`, both (batch, seq)): a token then attends within its document only
        (document_layout makes both from the ids)."""
        x = self.gpt_neox.embed_in(ids)
        for block in self.gpt_neox.layers:
            x = block(x, cache, positions, documents)
        if cache is not None:
            cache.length += ids.shape[1]
        return self.embed_out(self.gpt_neox.final_layer_norm(x))


def document_layout(ids: torch.Tensor, eod: int, positions: bool, documents: bool):
    """(positions, documents) of packed samples (batch, seq), each None unless asked for: the index of each
    token's document in its sample (the EOD closes the document it ends: the token after it starts the next), and
    each token's position from its document's first token (Megatron's reset_position_ids and
    reset_attention_mask)."""
    ends = ids == eod
    index = torch.cumsum(ends, dim=1) - ends.long()  # (batch, seq): EODs strictly before each token
    if not positions:
        return None, index if documents else None
    steps = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    starts = torch.where(torch.cat([torch.ones_like(ends[:, :1]), ends[:, :-1]], dim=1), steps, 0)
    return steps - torch.cummax(starts, dim=1).values, index if documents else None


def document_mask(documents: torch.Tensor) -> torch.Tensor:
    """(batch, 1, seq, seq) True where a token (row) may attend to another (column): the same document, not later."""
    seq = documents.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=documents.device).tril()
    return (documents.unsqueeze(2) == documents.unsqueeze(1)).logical_and(causal).unsqueeze(1)


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Activation checkpointing applied from outside, as compile is: each block of `model` keeps only its input in
    training and recomputes the rest in the backward pass (Megatron's and gpt-neox's checkpoint_num_layers: 1)."""
    for block in (m for m in model.modules() if isinstance(m, Block)):
        forward = block.forward

        def recomputed(x, cache=None, positions=None, documents=None, forward=forward, block=block):
            if block.training and cache is None:
                return checkpoint(forward, x, None, positions, documents, use_reentrant=False)
            return forward(x, cache, positions, documents)

        block.forward = recomputed
    return model


LOSS_CHUNK_TOKENS = 2048  # tokens whose fp32 logits exist at once in the loss: 2,048 x 50k x 4 B = 400 MB


def _summed_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")


IGNORED = -100  # a target that counts for nothing (torch's ignore_index): eod_mask_loss's EOD inputs


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean", masked: bool = False) -> torch.Tensor:
    """Next-token cross-entropy in fp32; (batch, seq) per token when reduction is 'none'. `masked`: targets may be
    IGNORED, which add nothing (0 per token) and are not counted in the mean.

    Logits in bf16/fp16 are upcast LOSS_CHUNK_TOKENS tokens at a time: their fp32 copy (3.3 GB for 8 x 2,048 x
    50k) never exists at once, and in training each chunk is recomputed in the backward pass instead of kept, so
    only the logits themselves stay. fp32 logits (a CPU run) take the plain path: there is no copy to save."""
    flat, labels = logits.flatten(0, 1), targets.flatten()
    if flat.dtype == torch.float32:
        loss = F.cross_entropy(flat, labels, reduction=reduction)
        return loss if reduction == "mean" else loss.view(targets.shape)
    chunks = [
        (flat[i : i + LOSS_CHUNK_TOKENS], labels[i : i + LOSS_CHUNK_TOKENS])
        for i in range(0, len(labels), LOSS_CHUNK_TOKENS)
    ]
    if reduction == "none":
        return torch.cat([F.cross_entropy(x.float(), y, reduction="none") for x, y in chunks]).view(targets.shape)
    count = (labels != IGNORED).sum() if masked else len(labels)
    if flat.requires_grad and torch.is_grad_enabled():
        return sum(checkpoint(_summed_loss, x, y, use_reentrant=False) for x, y in chunks) / count
    return sum(_summed_loss(x, y) for x, y in chunks) / count


class KVCache:
    """Keys and values of every block so far, preallocated for `max_len` positions."""

    def __init__(self, model: GPTNeoX, batch: int, max_len: int, device=None, dtype=None):
        c = model.config
        p = next(model.parameters())
        shape = (batch, c.num_attention_heads, max_len, c.head_dim)
        self.k = {}
        self.v = {}
        for block in model.gpt_neox.layers:
            self.k[block.attention] = torch.zeros(shape, device=device or p.device, dtype=dtype or p.dtype)
            self.v[block.attention] = torch.zeros(shape, device=device or p.device, dtype=dtype or p.dtype)
        self.length = 0

    def update(self, attention, k, v):
        """Append this step's keys and values for `attention`; the keys and values so far."""
        end = self.length + k.shape[2]
        self.k[attention][:, :, self.length : end] = k
        self.v[attention][:, :, self.length : end] = v
        return self.k[attention][:, :, :end], self.v[attention][:, :, :end]
