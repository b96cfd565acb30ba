"""Click commands of the tokenizer: train-tokenizer, compare-tokenizers. Thin: parse, call one function, print."""

import click

from pile_tools.ground import Size, echo_err, run_reporting_errors


@click.command("train-tokenizer")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Directory for the tokenizer.")
@click.option(
    "--vocab-size",
    type=int,
    default=50257,
    show_default=True,
    help="Ids in all: 2 special, 256 bytes, the merges and 23 space runs.",
)
@click.option("--max-bytes", type=Size(), default=None, help="Text to train on (default: the input's size).")
@click.option(
    "--component-weights",
    default="pile",
    show_default=True,
    help="Sampling weight per component: 'pile' epochs, 'none', or a JSON file; times each one's size.",
)
@click.option("--add-prefix-space", is_flag=True, help="A space before every string, as the paper describes.")
@click.option("--min-frequency", type=int, default=2, show_default=True, help="Least count of a pair to merge.")
@click.option("--seed", type=int, default=1234, show_default=True, help="Seed of the document sample.")
@click.option("--strict", is_flag=True, help="Fail on the first bad line instead of skipping it.")
@click.option(
    "--split",
    default="995,4,1",
    show_default=True,
    help="build-shards' train,valid,test: documents it would not train on are held out to measure on (1,0,0: none).",
)
def train_tokenizer(inputs, output, **opts):
    """Train GPT-NeoX-20B's byte-level BPE on Pile-format text (same inputs as build-shards).

    \b
    neox-data train-tokenizer pile_tools/sample --output tokenizer --vocab-size 16384
    neox-data train-tokenizer /data/pile/train --output tokenizer --max-bytes 10G

    Writes DIR/tokenizer.json laid out like the released GPT-NeoX-20B tokenizer (ids 0 and 1 special, the 256
    bytes, the merges, then the space-run tokens for 24 down to 2 spaces), the files transformers'
    AutoTokenizer reads, and train_report.json: the tokenizer measured on the documents build-shards would hold
    out of its train split (--split), and the ids encoding never produces (an error if there are any).
    """
    from tokenizer.train import train_tokenizer as run

    report = run_reporting_errors(run, list(inputs), output, echo=echo_err, **opts)
    v, held = report["vocabulary"], report["held_out"]
    click.echo(
        f"tokenizer in {output}: {v['total']:,} ids ({v['merges']:,} merges) from "
        f"{report['used_bytes'] / 1e6:,.1f} MB of text in {report['seconds']} s"
    )
    if held["measured_documents"]:
        click.echo(
            f"on {held['documents']:,} held-out document{'s' * (held['documents'] != 1)} "
            f"({held['measured_bytes'] / 1e3:,.0f} kB measured): "
            f"{held['bytes_per_token']:.2f} bytes/token, {held['tokens_per_word']:.2f} tokens/word, "
            f"Rényi {held['renyi_efficiency']:.3f}; {len(held['unreachable_ids'])} unreachable ids"
        )
    else:
        click.echo(
            f"{len(held['unreachable_ids'])} unreachable ids (no document held out with --split {held['split']})"
        )


@click.command("compare-tokenizers")
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--tokenizer",
    "tokenizers",
    multiple=True,
    required=True,
    help="gpt2, gpt-neox-20b, a tokenizer.json or a directory holding one; repeat to compare several.",
)
@click.option("--baseline", default="gpt2", show_default=True, help="The tokenizer the ratios are taken against.")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Directory for the reports.")
def compare_tokenizers(inputs, tokenizers, baseline, output):
    """Count tokens per component against a baseline, as the paper's Appendix E (Tables 14-16).

    \b
    neox-data compare-tokenizers pile_tools/sample --tokenizer gpt-neox-20b --output compare
    neox-data compare-tokenizers val.jsonl.zst --tokenizer my-tokenizer --tokenizer gpt-neox-20b --output compare

    Each document is encoded on its own, without special tokens or EOD. Also measured per tokenizer, overall and
    per component: bytes per token, tokens per word, Renyi efficiency (alpha 2.5), the share of the vocabulary
    used, and the ids encoding never produces. Writes report.json, report.md, report.csv, compression.png and a
    figure per measure into DIR.
    """
    from tokenizer.compare import compare_tokenizers as run

    report = run_reporting_errors(run, list(inputs), list(tokenizers), baseline, output, echo=echo_err)
    total, base = report["total"], report["baseline"]
    width = max(20, *map(len, report["tokenizers"]))
    for name in report["tokenizers"]:
        tokens, m = total["tokens"][name], report["metrics"][name]
        click.echo(
            f"{name:<{width}} {tokens:>14,} tokens  {tokens / total['tokens'][base]:.3f} x {base}  "
            f"{m['bytes_per_token']:.2f} bytes/token  {m['tokens_per_word']:.2f} tokens/word  "
            f"Rényi {m['renyi_efficiency']:.3f}  {m['vocabulary_used']:.1%} of ids used  "
            f"{len(m['unreachable_ids'])} unreachable"
        )
    click.echo(f"report in {output}/report.md")
