"""neox-data generate: sampling from a model with the KV cache (greedy, or temperature with nucleus top-p
filtering), and the command's glue (load a checkpoint and its tokenizer, encode the prompt, sample, decode)."""

import torch

from pile_tools.ground import InputError
from trainer.checkpoint import checkpoint_dir, load_checkpoint
from trainer.model import GPTNeoX, KVCache


def next_token(logits: torch.Tensor, vocab_size: int, greedy: bool, temperature: float, top_p: float, generator) -> int:
    """The next id from the last position's logits: greedy, or sampled with temperature and top-p."""
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
    model: GPTNeoX,
    prompt: list[int],
    max_new_tokens: int,
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    use_cache: bool = True,
    stop: int | None = None,
) -> list[int]:
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


def generate_from_checkpoint(checkpoint: str, prompt: str | None, prompt_ids: str | None, **options) -> dict:
    """generate's command: load a checkpoint and its tokenizer, encode the prompt, sample, decode."""
    from tokenizers import Tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_checkpoint(checkpoint, device)
    path = checkpoint_dir(checkpoint) / "tokenizer" / "tokenizer.json"
    tok = Tokenizer.from_file(str(path)) if path.is_file() else None
    if prompt_ids is not None:
        try:
            ids = [int(x) for x in prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise InputError(f"--prompt-ids {prompt_ids!r}: expected comma-separated integers") from None
    elif tok is None:
        raise InputError(f"{checkpoint} has no tokenizer: pass --prompt-ids")
    else:
        ids = tok.encode(prompt, add_special_tokens=False).ids
    if not ids:
        raise InputError("the prompt is empty")
    vocab = model.config.vocab_size
    if bad := [i for i in ids if not 0 <= i < vocab]:
        raise InputError(f"--prompt-ids: {bad[0]} is not a token id of {checkpoint} (0 to {vocab - 1:,})")
    eod = tok.token_to_id("<|endoftext|>") if tok else None
    out = generate(model, ids, options.pop("max_new_tokens"), stop=eod, **options)
    decode = (lambda x: tok.decode(x)) if tok else (lambda x: "")
    return {
        "prompt_ids": ids,
        "generated_ids": out,
        "prompt": prompt if prompt is not None else decode(ids),
        "text": decode(out),
    }
