"""train-tokenizer against plain `tokenizers` train_from_iterator on the same bytes, side by side.

    .venv/bin/python benchmarks/tokenizer.py [--corpus ../shared/corpus/mini-pile] [--vocab-size 50257]

Both train on every document of the corpus once (`--component-weights none --split 1,0,0`), each capped at the
same length, with the same trainer settings (vocabulary, specials, byte alphabet, min frequency, NFC +
ByteLevel). The baseline reads with zstandard + orjson and feeds whole documents; ours reads twice (sizes, then
the sample), cuts the text at the space-run tokens, adds the space-run tokens afterwards and checks every id is
reachable. Each runs in its own process; wall time and peak RSS (process tree, sampled every 100 ms) are printed
with their ratio (goal: <= 1.1x time).

    .venv/bin/python benchmarks/tokenizer.py --compare-against 503a261 [--corpus ../shared/corpus/mini-pile]

times compare-tokenizers (gpt2 against gpt-neox-20b) as this checkout runs it beside the same command at an earlier
commit (a git worktree under benchmarks/.work), interleaved: what the tokenizer measures cost (goal: <= 1.2x).
"""

import argparse
import io
import subprocess
import sys
from pathlib import Path

from shards import ROOT, WORK, measure

sys.path.remove(str(Path(__file__).resolve().parent))  # this file's name would shadow the `tokenizer` package


def baseline(corpus: Path, vocab_size: int, out: Path) -> None:
    import orjson
    import zstandard
    from tokenizers import pre_tokenizers, trainers

    from tokenizer.train import SPACE_RUNS, SPECIALS, build_tokenizer

    texts = []
    for path in sorted(corpus.glob("*.jsonl.zst")):
        with open(path, "rb") as fh:
            texts += [
                orjson.loads(line)["text"] for line in io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(fh))
            ]
    cap = min(1 << 20, max(64 << 10, sum(len(t.encode()) for t in texts) // 1000))  # the cap train-tokenizer uses
    tok = build_tokenizer(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPACE_RUNS),
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [t if len(t.encode()) <= cap else t.encode()[:cap].decode("utf-8", errors="ignore") for t in texts]
    tok.train_from_iterator(iter(texts), trainer=trainer)
    tok.save(str(out))


def compare_side_by_side(corpus: Path, rev: str, repeat: int) -> None:
    """compare-tokenizers here and at commit `rev`, interleaved; medians and their ratio."""
    old = WORK / f"checkout-{rev}"
    if not old.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(old), rev], cwd=ROOT, check=True, capture_output=True)

    def cmd(out: str) -> list[str]:
        return [sys.executable, "-m", "cli", "compare-tokenizers", str(corpus), "--tokenizer", "gpt-neox-20b",
                "--output", str(WORK / out)]  # fmt: skip

    runs = {"then": [], "now": []}
    for _ in range(repeat):  # interleaved, so both see the same background load; -m cli imports the cwd's code
        runs["then"].append(measure(cmd("compare-then"), cwd=old))
        runs["now"].append(measure(cmd("compare-now"), cwd=ROOT))
    then, now = (sorted(r.seconds for r in runs[k])[repeat // 2] for k in ("then", "now"))
    ratios = sorted(n.seconds / t.seconds for n, t in zip(runs["now"], runs["then"]))
    print(f"compare-tokenizers on {corpus}, medians of {repeat} interleaved runs")
    print(f"at {rev}: {then:.1f} s; now, with the measures: {now:.1f} s")
    print(f"now / then: {now / then:.2f} (per pair: {', '.join(f'{r:.2f}' for r in ratios)}; goal <= 1.2)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus" / "mini-pile")
    parser.add_argument("--vocab-size", type=int, default=50257)
    parser.add_argument("--repeat", type=int, default=3, help="Interleaved runs of each; medians are reported.")
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compare-against", metavar="REV", help="Time compare-tokenizers against commit REV instead.")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.compare_against:
        return compare_side_by_side(args.corpus, args.compare_against, args.repeat)
    if args.baseline:
        return baseline(args.corpus, args.vocab_size, WORK / "baseline-tokenizer.json")
    neox_data = str(Path(sys.executable).parent / "neox-data")
    plain_cmd = [
        sys.executable,
        __file__,
        "--baseline",
        "--corpus",
        str(args.corpus),
        "--vocab-size",
        str(args.vocab_size),
    ]
    ours_cmd = [
        neox_data,
        "train-tokenizer",
        str(args.corpus),
        "--output",
        str(WORK / "tokenizer"),
        "--vocab-size",
        str(args.vocab_size),
        "--component-weights",
        "none",
        "--split",
        "1,0,0",  # every document, as the baseline (its report still checks for unreachable ids)
    ]
    runs = {"plain": [], "ours": []}
    for _ in range(args.repeat):  # interleaved, so both see the same background load
        runs["plain"].append(measure(plain_cmd))
        runs["ours"].append(measure(ours_cmd))
    plain, ours = (tuple(sorted(x)[len(x) // 2] for x in zip(*runs[k])) for k in ("plain", "ours"))
    ratios = sorted(o[0] / p[0] for o, p in zip(runs["ours"], runs["plain"]))
    print(f"corpus {args.corpus}, vocabulary {args.vocab_size:,}, medians of {args.repeat} interleaved runs")
    print(f"{'run':<40} {'seconds':>8} {'peak RSS MB':>12}")
    for name, (seconds, rss, *_) in (("tokenizers train_from_iterator", plain), ("neox-data train-tokenizer", ours)):
        print(f"{name:<40} {seconds:>8.1f} {rss / 2**20:>12.0f}")
    print(
        f"wall time, ours / plain: {ours[0] / plain[0]:.2f} (per pair: {', '.join(f'{r:.2f}' for r in ratios)}; "
        f"goal <= 1.1); peak RSS: {ours[1] / plain[1]:.2f}"
    )


if __name__ == "__main__":
    main()
