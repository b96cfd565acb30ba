"""generate's glue: load a checkpoint and its tokenizer, encode the prompt, sample, decode."""

import torch

from pile_tools.ground import InputError
from trainer.checkpoint import checkpoint_dir, load_checkpoint
from trainer.generate import generate


def sample(checkpoint: str, prompt: str | None, prompt_ids: str | None, **options) -> dict:
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
    eod = tok.token_to_id("<|endoftext|>") if tok else None
    out = generate(model, ids, options.pop("max_new_tokens"), stop=eod, **options)
    decode = (lambda x: tok.decode(x)) if tok else (lambda x: "")
    return {"prompt_ids": ids, "generated_ids": out, "prompt": prompt if prompt is not None else decode(ids),
            "text": decode(out)}  # fmt: skip
