"""Sampling from a model with the KV cache: greedy, or temperature with nucleus (top-p) filtering."""

import torch

from trainer.model import GPTNeoX, KVCache


def next_token(logits: torch.Tensor, vocab_size: int, greedy: bool, temperature: float, top_p: float, generator) -> int:
    logits = logits[:vocab_size].float()  # the padded ids beyond the tokenizer are never produced
    if greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits / max(temperature, 1e-6), dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the smallest set whose mass reaches top_p
    sorted_probs = sorted_probs * keep
    return int(order[torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)])


@torch.no_grad()
def generate(
    model: GPTNeoX, prompt: list[int], max_new_tokens: int, *, greedy: bool = True, temperature: float = 1.0,
    top_p: float = 1.0, seed: int = 0, use_cache: bool = True, stop: int | None = None,
) -> list[int]:  # fmt: skip
    """The ids generated after `prompt` (at most `max_new_tokens`, ending early at `stop`)."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.tensor([prompt], device=device)
    cache = KVCache(model, 1, len(prompt) + max_new_tokens) if use_cache else None
    out: list[int] = []
    logits = model(ids, cache)[0, -1]
    for _ in range(max_new_tokens):
        token = next_token(logits.cpu(), vocab, greedy, temperature, top_p, generator)
        out.append(token)
        if token == stop:
            break
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
        logits = model(ids[:, -1:], cache)[0, -1] if use_cache else model(ids)[0, -1]
    return out
