"""Click commands of the data path: build-shards, merge-shards, inspect. Thin: parse, call one function, print."""

import os

import click

from pile_tools.ground import Size, echo_err, run_reporting_errors


@click.command("build-shards")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--tokenizer", required=True, help="tokenizer.json, a directory holding one, or gpt2 / gpt-neox-20b.")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option(
    "--weights",
    default="pile",
    show_default=True,
    help="Epochs per component: 'pile' (the Pile paper's Table 1), 'none' (1 each), or a JSON file.",
)
@click.option(
    "--split", default="995,4,1", show_default=True, help="train,valid,test weights, all three (0 leaves a split out)."
)
@click.option(
    "--workers", type=click.IntRange(min=1), default=os.cpu_count(), show_default=True, help="Encoding processes."
)
@click.option(
    "--component",
    default=None,
    help="Component of documents without meta.pile_set_name (default: the file's name).",
)
@click.option(
    "--materialize",
    is_flag=True,
    help="Also write the train split's repeats to disk as one dataset, for tools that cannot blend.",
)
@click.option("--seed", type=int, default=1234, show_default=True, help="Seed of --materialize's fractions.")
@click.option(
    "--rank", type=click.IntRange(min=0), default=0, show_default=True, help="This process's share of the parts."
)
@click.option(
    "--world-size", type=click.IntRange(min=1), default=1, show_default=True, help="Processes sharing the parts."
)
@click.option(
    "--part-size",
    type=Size(),
    default="256M",
    show_default=True,
    help="Uncompressed .jsonl files are cut into parts of this many bytes.",
)
@click.option("--max-doc-bytes", type=Size(), default=0, help="Skip (and count) longer documents; 0: no limit.")
@click.option("--strict", is_flag=True, help="Fail on the first bad line instead of skipping it.")
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="ray: each of the --world-size ranks a Ray task (retried if its worker dies), then the merge.",
)
@click.option(
    "--ray-address", default=None, help="Ray cluster for --executor ray (default: a running local one, else a new one)."
)
def build_shards(inputs, tokenizer, output, executor, ray_address, **options):
    """Tokenize Pile-format text into Megatron .bin/.idx shards, one per split and component.

    \b
    neox-data build-shards pile_tools/sample --tokenizer gpt-neox-20b --output shards --split 90,5,5
    neox-data build-shards /data/pile/train --tokenizer gpt-neox-20b --weights none --output /data/shards

    INPUT: .jsonl.zst, .jsonl.gz, .jsonl or .txt files, directories of them, or a Hugging Face dataset
    (owner/name or hf:owner/name[:split], streamed). A document is the `text` field; its component is
    meta.pile_set_name, else --component, else the file's name. Each document ends with <|endoftext|>.

    Writes DIR/<split>/<component>.bin/.idx, DIR/blend.json (sampling weights ∝ epochs x tokens, also as a
    Megatron --data-path and gpt-neox train_data_paths/weights) and DIR/manifest.json. Rerunning after a crash
    redoes only unfinished parts; the shards do not depend on --workers.

    The released Pile's train files (00.jsonl.zst ... 29.jsonl.zst) are ALREADY upsampled: build them with
    --weights none. --weights pile is for component-wise, not yet upsampled input.

    --executor ray --world-size N runs the N ranks as Ray tasks on the cluster at --ray-address (OUTPUT on storage
    every node sees), retries a rank whose worker died, skips ranks already done, and merges: the same bytes.
    """
    from pile_tools.options import BuildOptions

    options = BuildOptions(**options)
    if not 0 <= options.rank < options.world_size:
        raise click.BadParameter(
            f"--rank {options.rank} must be in [0, --world-size {options.world_size})", param_hint="--rank"
        )
    if executor == "ray":
        from pile_tools.on_ray import build_on_ray

        if options.rank:
            raise click.BadParameter("--executor ray runs every rank of --world-size itself", param_hint="--rank")
        out = run_reporting_errors(build_on_ray, list(inputs), tokenizer, output, options, ray_address, echo=echo_err)
    elif ray_address is not None:
        raise click.BadParameter("--ray-address is for --executor ray", param_hint="--ray-address")
    else:
        from pile_tools.build import build_shards as run

        out = run_reporting_errors(run, list(inputs), tokenizer, output, options, echo=echo_err)
    if out is not None:
        click.echo(f"shards in {out}  (blend.json, manifest.json; look inside with: neox-data inspect {out})")


@click.command("merge-shards")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Output directory.")
def merge_shards(dirs, output):
    """Join the outputs of `build-shards --rank I --world-size N` runs into the shards one run would write.

    \b
    neox-data merge-shards /shared/shards --output /shared/shards
    neox-data merge-shards out-rank0 out-rank1 --output shards
    """
    from pile_tools.build import merge_shards as run

    out = run_reporting_errors(run, list(dirs), output, echo=echo_err)
    click.echo(f"shards in {out}")


@click.command("inspect")
@click.argument("target", type=click.Path(exists=False))
@click.option(
    "--decode", type=click.IntRange(min=0), default=0, help="Decode and print the first N documents of each shard."
)
@click.option("--tokenizer", default=None, help="Tokenizer for --decode (default: the one in manifest.json).")
@click.option(
    "--chars", type=click.IntRange(min=0), default=400, show_default=True, help="Characters shown per decoded document."
)
def inspect_shards(target, decode, tokenizer, chars):
    """Print counts per shard of a build-shards directory or one .bin/.idx prefix, and decode documents.

    \b
    neox-data inspect shards
    neox-data inspect shards/train/github --decode 2 --chars 200
    """
    from pile_tools.inspect import inspect

    run_reporting_errors(inspect, target, decode, tokenizer, chars, click.echo)


@click.command("verify")
@click.argument("targets", nargs=-1, required=True, type=click.Path(exists=False))
@click.option("--tokenizer", default=None, help="Vocabulary and EOD id to check against (default: the manifest's).")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=os.cpu_count(),
    show_default=True,
    help="Shards (or checkpoint files) checked at once.",
)
def verify_shards(targets, tokenizer, workers):
    """Audit shards or checkpoints in full, at disk speed; one line per problem, exit status 1 on any.

    \b
    neox-data verify shards/
    neox-data verify /data/megatron/pile_text_document --tokenizer gpt-neox-20b
    neox-data verify run/                  # every checkpoint of a training run
    neox-data verify run/global_step1000

    Checks that each .idx and .bin agree, every document ends with EOD, every id is in the vocabulary, the
    checksums and counts equal manifest.json's, and blend.json's shards exist with their token counts. A
    checkpoint's files are checked against its checksums.json, and a run's `latest` must name one of them.
    """
    from pile_tools.verify import verify_or_fail

    run_reporting_errors(verify_or_fail, list(targets), tokenizer, workers, click.echo)
