"""Training tokens/s of `neox-data train` against a plain PyTorch loop over transformers' GPTNeoXForCausalLM.

    .venv/bin/python benchmarks/train.py [--config configs/pythia-70M.yml] [--micro 4] [--seq 512] [--steps 12]
    python benchmarks/train.py --config configs/pythia-1B.yml --micro 8 --seq 2048 --steps 20 --bf16   # on a GPU

Same config, same global batch (micro-batch x accumulation), same sequence length, random tokens from a synthetic
shard written under benchmarks/.work/. Ours is the real command (`neox-data train`, DeepSpeed, one process); its
tokens/s, TFLOPS and MFU come from its metrics.jsonl. The baseline is the loop people write by hand: forward,
fp32 cross-entropy, backward, clip, AdamW, LR schedule — on GPTNeoXForCausalLM (bf16 autocast when --bf16).
Each runs in its own process, alternating, --rounds times; medians over the steps after --warmup are printed with
the ratio (goal: ours / plain >= 1.0). With --doc-mask the two sides are ours without and with documents masked
from each other (eod_mask_loss, reset_attention_mask, reset_position_ids: an attention mask per sample), and the
ratio is the cost of the masking. Step time includes each side's data loading. Also printed: each side's peak
memory (the CUDA allocator's peak, or the peak resident set on a CPU) and the share of our step spent waiting for
data (read ahead in a thread).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WORK = Path(__file__).parent / ".work" / "train"


def write_shards(root: Path, tokens: int, vocab: int) -> Path:
    """A build-shards-like directory: one train and one valid shard of random tokens, each document closed by the
    GPT-NeoX tokenizer's EOD (id 0), and blend.json."""
    from pile_tools.indexed import ShardWriter

    if (root / "blend.json").is_file():
        return root
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", tokens), ("valid", tokens // 10 + 10_000), ("test", tokens // 10 + 10_000)):
        sizes = rng.integers(200, 4000, size=n // 2000 + 1)
        writer = ShardWriter(root / split / "random", np.uint16)
        ids = rng.integers(1, vocab, size=int(sizes.sum())).astype(np.uint16)
        ids[np.cumsum(sizes) - 1] = 0  # each document ends with the EOD
        writer.add(ids, sizes)
        writer.close()
        splits[split] = {"shards": [{"prefix": f"{split}/random", "weight": 1.0}]}
    (root / "blend.json").write_text(json.dumps({"splits": splits}))
    return root


def ours(args, overrides: list[str]) -> list[dict]:
    save = WORK / "run"
    subprocess.run(["rm", "-rf", str(save)], check=True)
    cmd = [
        sys.executable,
        "-m",
        "cli",
        "train",
        "--config",
        args.config,
        "--data",
        str(args.data),
        "--save",
        str(save),
        *sum((["--set", o] for o in overrides), []),
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if not args.verbose else None)
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"][args.warmup :]


def plain(args) -> list[dict]:
    """The hand-written loop, in this process (called through --plain)."""
    import torch
    import torch.nn.functional as F
    from transformers import GPTNeoXForCausalLM

    from trainer.config import DataConfig, load_config
    from trainer.hf import hf_config
    from trainer.metrics import peak_memory_gib
    from trainer.samples import micro_batch, resolve_sources, split_dataset

    config = load_config(args.config, overrides(args))
    t = config.training
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(t.seed)
    model = GPTNeoXForCausalLM(hf_config(config.model)).to(device)
    if config.model.checkpoint_activations:
        model.gradient_checkpointing_enable()
    data = split_dataset(
        resolve_sources(DataConfig(data_dir=args.data))["train"],
        t.train_iters * t.train_micro_batch_size_per_gpu * t.gradient_accumulation_steps,
        t.seq_length,
        t.seed,
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.optimizer.lr, betas=config.optimizer.betas, fused=device == "cuda"
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, t.train_iters)
    times = []
    for step in range(t.train_iters):
        start = time.perf_counter()
        for m in range(t.gradient_accumulation_steps):
            ids = micro_batch(
                data,
                step,
                m,
                t.train_micro_batch_size_per_gpu,
                1,
                0,
                t.train_micro_batch_size_per_gpu * t.gradient_accumulation_steps,
            ).to(device)
            with torch.autocast(device, torch.bfloat16, enabled=args.bf16):
                logits = model(ids[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            (loss / t.gradient_accumulation_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.gradient_clipping)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    tokens = t.train_micro_batch_size_per_gpu * t.gradient_accumulation_steps * t.seq_length
    peak = peak_memory_gib(torch.device(device) if device == "cuda" else None)
    return [{"tokens_per_s": tokens / s, "peak_memory_gib": peak} for s in times[args.warmup :]]


def tokens_per_step(args) -> int:
    return args.micro * args.accumulation * args.seq


def overrides(args) -> list[str]:
    out = [
        f"train_micro_batch_size_per_gpu={args.micro}",
        f"gradient_accumulation_steps={args.accumulation}",
        f"seq_length={args.seq}",
        f"max_position_embeddings={max(args.seq, 2048)}",
        f"train_iters={args.steps}",
        "eval_interval=0",
        "save_interval=0",
        "log_interval=1000000",
        f"bf16={args.bf16}",
        "fp16=false",
        f"checkpoint_activations={args.checkpoint_activations}",
        "zero_optimization={stage: 0}",
    ]
    return out + list(args.set)


PACKED = ["eod_mask_loss=true", "reset_attention_mask=true", "reset_position_ids=true", "tokenizer=gpt-neox-20b"]


def run_rounds(args) -> dict[str, list]:
    """Ours and the plain loop (with --doc-mask: ours without and with the masking) alternately, `rounds` times:
    each run's per-step rows, by name."""
    sides = ["unmasked", "masked"] if args.doc_mask else ["ours", "plain"]
    results = {name: [] for name in sides}
    for r in range(args.rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        for name in order:
            if name == "plain" and args.only_ours:
                continue
            if name != "plain":
                rows = ours(args, overrides(args) + (PACKED if name == "masked" else []))
            else:
                cmd = [sys.executable, __file__, "--plain", *sys.argv[1:], "--data", str(args.data)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ).stdout
                rows = json.loads(out.strip().splitlines()[-1])
            results[name].append(rows)
            print(
                f"round {r} {name:<6} {statistics.median(x['tokens_per_s'] for x in rows):>10,.0f} tokens/s", flush=True
            )
    return results


def report(args, results: dict[str, list]) -> None:
    """Medians of tokens/s, TFLOPS and MFU, data wait and peak memory, and the ratios to the plain loop."""
    summary = {
        name: statistics.median(x["tokens_per_s"] for rows in runs for x in rows)
        for name, runs in results.items()
        if runs
    }
    print(
        f"{args.config}: micro {args.micro} x accumulation {args.accumulation} x {args.seq} tokens, "
        f"{'bf16' if args.bf16 else 'fp32'}, median over {args.rounds} rounds of steps {args.warmup + 1}-{args.steps}"
    )
    for name, value in summary.items():
        print(f"{name:<6} {value:>10,.0f} tokens/s")
    if args.doc_mask:
        print(f"masked / unmasked: {summary['masked'] / summary['unmasked']:.2f} (the cost of masking documents)")
        return
    ours_rows = [x for rows in results["ours"] for x in rows]
    if ours_rows and ours_rows[0].get("tflops_per_gpu") is not None:
        print(
            f"ours   {statistics.median(x['tflops_per_gpu'] for x in ours_rows):.1f} TFLOPS/GPU (hardware), "
            f"MFU {statistics.median(x['mfu'] or 0 for x in ours_rows):.1%} (model FLOPs), "
            f"HFU {statistics.median(x.get('hfu') or 0 for x in ours_rows):.1%} (recompute counted)"
        )
    if ours_rows:
        wait = statistics.median(x["data_wait_s"] * x["tokens_per_s"] / tokens_per_step(args) for x in ours_rows)
        print(f"ours   data wait {wait:.2%} of step time (goal <= 1%)")
    if "plain" in summary:
        print(f"ours / plain: {summary['ours'] / summary['plain']:.2f} (goal >= 1.15 on CUDA, issue 14)")
        peak = {name: max(x["peak_memory_gib"] for rows in runs for x in rows) for name, runs in results.items()}
        print(
            f"peak memory: ours {peak['ours']:.2f} GiB, plain {peak['plain']:.2f} GiB, ours / plain "
            f"{peak['ours'] / peak['plain']:.2f} (goal <= 0.75 on CUDA; on a CPU, the process's peak resident set)"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pythia-70M.yml")
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--checkpoint-activations", action="store_true")
    parser.add_argument("--only-ours", action="store_true", help="Skip the baseline (e.g. to read MFU alone).")
    parser.add_argument("--doc-mask", action="store_true", help="Ours without and with documents masked, side by side.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Another override.")
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--data", type=Path, default=None)
    args = parser.parse_args()
    if args.plain:
        print(json.dumps(plain(args)))
        return
    args.data = args.data or write_shards(WORK / "shards-eod", tokens=4_000_000, vocab=50_000)
    report(args, run_rounds(args))


if __name__ == "__main__":
    main()
