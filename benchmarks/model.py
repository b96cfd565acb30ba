"""Forward + backward tokens/s of our GPT-NeoX against transformers' GPTNeoXForCausalLM, same config, same batch.

    .venv/bin/python benchmarks/model.py [--config configs/pythia-70M.yml] [--batch 4] [--seq 512] [--steps 10]

Both models get the same weights (ours exported through export-hf's conversion), the same random ids and the
same loss (cross-entropy over the logits), fp32 on CPU (bf16 on a GPU if there is one). Runs alternate, so both
see the same background load; medians are printed with the ratio (goal: ours / transformers >= 1.0).
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import GPTNeoXForCausalLM

from trainer.config import load_config
from trainer.hf import hf_config
from trainer.model import GPTNeoX


def step(forward, ids) -> None:
    logits = forward(ids)
    F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()


def timed(fn, ids, device) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(fn, ids)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pythia-70M.yml")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = load_config(args.config).model  # our model checkpoints activations only when the trainer asks
    torch.manual_seed(0)
    ours = GPTNeoX(config).to(device, dtype)
    theirs = GPTNeoXForCausalLM(hf_config(config))
    theirs.load_state_dict(
        {
            ("lm_head.weight" if k == "embed_out.weight" and "lm_head.weight" in theirs.state_dict() else k): v
            for k, v in ours.state_dict().items()
        },
        strict=False,
    )
    theirs = theirs.to(device, dtype)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    fns = {"ours": ours, "transformers": lambda x: theirs(x).logits}
    for fn in fns.values():  # warm up
        step(fn, ids)
    times = {name: [] for name in fns}
    for i in range(args.steps):
        for name in list(fns)[:: 1 if i % 2 else -1]:  # alternate which goes first
            ours.zero_grad(set_to_none=True)
            theirs.zero_grad(set_to_none=True)
            times[name].append(timed(fns[name], ids, device))
    tokens = args.batch * args.seq
    print(
        f"{args.config}: {sum(p.numel() for p in ours.parameters()) / 1e6:.0f}M parameters, batch {args.batch} x "
        f"{args.seq}, {device} {dtype}, forward + backward, median of {args.steps}"
    )
    for name, t in times.items():
        print(f"{name:<14} {tokens / statistics.median(t):>10,.0f} tokens/s")
    ratio = statistics.median(times["transformers"]) / statistics.median(times["ours"])
    pairs = statistics.median(t / o for t, o in zip(times["transformers"], times["ours"]))
    print(f"ours / transformers: {ratio:.2f} (median of per-step ratios {pairs:.2f}; goal >= 1.0)")


if __name__ == "__main__":
    main()
