"""Click commands of the model and its training: plan, export-hf, import-hf, generate, train, batch, evaluate,
decontaminate. Thin:
parse, call one function, print."""

import json
import os

import click

from pile_tools.ground import long_lived, run_reporting_errors

# OpenMP threads waiting for work sleep instead of spinning (unless the user says otherwise): on a CPU shared with
# other work (a laptop, a loaded CI machine) spinning threads hold the cores the working ones need. The tiny
# model's 30 steps beside one CPU-bound process took 65-72 s spinning, 33-34 s sleeping; idle, 20-21 s either
# way. Set here, before any command loads torch and its libgomp, which reads it once.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

CONFIG_HELP = (
    "YAML config (gpt-neox's work as they are). Repeat it to merge several left to right, as gpt-neox's "
    "deepy.py does: --config configs/20B.yml --config local_setup.yml."
)
SET_HELP = (
    "Override a config key, in gpt-neox's names (those of configs/*.yml): --set train_iters=100. "
    "Repeat it for several keys; the value is read as YAML."
)


config_option = click.option(
    "--config", "config_path", required=True, multiple=True, type=click.Path(dir_okay=False), help=CONFIG_HELP
)


@click.command("plan")
@config_option
@click.option(
    "--gpus", type=click.IntRange(min=1), default=None, help="GPUs in all (default: one model replica, TP x PP)."
)
@click.option("--tflops", type=float, default=117.0, show_default=True, help="Sustained TFLOPS per GPU.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plan(config_path, gpus, tflops, overrides, as_json):
    """Parameters, memory per GPU, FLOPs, time and GPU-hours of a config's run, without building the model.

    \b
    neox-data plan --config configs/20B.yml --gpus 96
    neox-data plan --config configs/pythia-1B.yml --gpus 8 --set train_micro_batch_size_per_gpu=8 --json
    """
    from trainer.config import load_config
    from trainer.plan import as_dict, describe, make_plan

    config = run_reporting_errors(load_config, list(config_path), overrides)
    result = run_reporting_errors(make_plan, config, gpus, tflops)
    click.echo(json.dumps(as_dict(result), indent=1) if as_json else describe(result))


@click.command("export-hf")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Directory for the HF model.")
@click.option("--tokenizer", default=None, help="Tokenizer to ship (default: the checkpoint's own).")
def export_hf(checkpoint, output, tokenizer):
    """Write a checkpoint as a Hugging Face GPTNeoXForCausalLM directory (config, safetensors, tokenizer).

    \b
    neox-data export-hf run --output hf          (a run's latest checkpoint)
    neox-data export-hf run/global_step1000 --output hf-1000
    """
    from trainer.hf import export_hf as run

    click.echo(f"Hugging Face model in {run_reporting_errors(run, checkpoint, output, tokenizer)}")


@click.command("import-hf")
@click.argument("hf_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Directory for the checkpoint.")
def import_hf(hf_dir, output):
    """Make a checkpoint from a Hugging Face GPT-NeoX directory (Pythia, GPT-NeoX-20B, an export).

    \b
    neox-data import-hf pythia-70m --output pythia-70m-ckpt
    """
    from trainer.hf import import_hf as run

    click.echo(f"checkpoint in {run_reporting_errors(run, hf_dir, output)}")


@click.command("generate")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", default=None, help="Text to continue.")
@click.option("--prompt-ids", default=None, help="Token ids to continue, comma-separated.")
@click.option(
    "--max-new-tokens", type=click.IntRange(min=0), default=32, show_default=True, help="Tokens to generate at most."
)
@click.option("--greedy", is_flag=True, help="Always the most likely token.")
@click.option(
    "--temperature",
    type=click.FloatRange(min=0.0, min_open=True),
    default=1.0,
    show_default=True,
    help="Divides the logits before sampling: below 1 sharper, above 1 flatter.",
)
@click.option(
    "--top-p",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=0.9,
    show_default=True,
    help="Sample from the fewest tokens whose probability reaches this (nucleus sampling).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling.")
@click.option("--json", "as_json", is_flag=True, help="Print the prompt and generated ids and text as JSON.")
def generate(checkpoint, prompt, prompt_ids, max_new_tokens, greedy, temperature, top_p, seed, as_json):
    """Sample from a checkpoint with the KV cache, on the GPU if there is one.

    \b
    neox-data generate run --prompt "The" --greedy
    neox-data generate run --prompt-ids 510,1032 --max-new-tokens 64 --temperature 0.8 --top-p 0.95 --json
    """
    from trainer.generate import generate_from_checkpoint

    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of --prompt and --prompt-ids")
    result = run_reporting_errors(
        generate_from_checkpoint,
        checkpoint,
        prompt,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    click.echo(json.dumps(result, ensure_ascii=False) if as_json else result["prompt"] + result["text"])


data_option = click.option(
    "--data",
    "data_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="A build-shards output directory (default: the config's data keys).",
)


@click.command("train")
@config_option
@data_option
@click.option("--save", default=None, type=click.Path(file_okay=False), help="Checkpoints and metrics go here.")
@click.option(
    "--load", default=None, type=click.Path(file_okay=False), help="Resume from this run's latest checkpoint."
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--dry-run", is_flag=True, help="Print the parallel layout (stages, ranks, memory) and stop.")
@click.option(
    "--world-size", type=click.IntRange(min=1), default=None, help="With --dry-run: the number of GPUs to lay out."
)
def train(config_path, data_dir, save, load, overrides, dry_run, world_size):
    """Train a GPT-NeoX model with DeepSpeed; one process, or many under the `deepspeed` launcher.

    \b
    neox-data train --config configs/tiny.yml --data shards --save run
    deepspeed --num_gpus 8 $(which neox-data) train --config configs/pythia-160M.yml --data shards --save run
    """
    from trainer.stopping import StopRequests

    stops = StopRequests()
    with stops.listening():  # from the start: a SIGTERM while torch loads is kept for the first step, not fatal
        train_listening(config_path, data_dir, save, load, overrides, dry_run, world_size, stops)


def train_listening(config_path, data_dir, save, load, overrides, dry_run, world_size, stops) -> None:
    """`train`'s work, its stop signals recorded in `stops`."""
    with long_lived():  # torch and DeepSpeed, kept to the end
        import torch

        from trainer.config import load_config
        from trainer.start import train as run

    flags = {"data_dir": data_dir, "save": save, "load": load}
    device = None if dry_run else "cuda" if torch.cuda.is_available() else "cpu"  # a dry run plans for GPUs
    config = run_reporting_errors(load_config, list(config_path), overrides, flags, device)
    if dry_run:  # no process group, no model: the 20B layout on 96 GPUs can be checked on a laptop
        from trainer.plan import describe_layout

        click.echo(run_reporting_errors(describe_layout, config, config.world_size(world_size)))
        return
    result = run_reporting_errors(train_or_leave, run, config, stops)
    save = config.paths.save
    if int(os.environ.get("RANK", 0)) == 0 and "finished" in result:
        t = config.training.train_iters
        click.echo(f"nothing to train: {result['finished']} is at step {result['step']} (train_iters {t})")
    elif int(os.environ.get("RANK", 0)) == 0:
        valid = result.get("valid") or {}
        first = result.get("first_valid") or {}
        line = f"trained to step {result['step']}, train loss {result.get('train_loss', float('nan')):.4f}"
        if valid:
            line += f", valid loss {first['loss']:.4f} -> " if first else ", valid loss "
            line += f"{valid['loss']:.4f}"
        click.echo(line + (f"; checkpoints in {save}" if save else ""))
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        leave_without_teardown()


def train_or_leave(run, config, stops) -> dict:
    """run(config, stops); a rank of a multi-process run that ends early leaves at once, skipping the teardown
    (leave_without_teardown): stopped on request with its step saved, with STOPPED after its line; a rank lost on
    the way, with 1 after the line naming it (said by rank 0 alone), as a teardown could wait on the lost peer."""
    from trainer.stopping import STOPPED, PeerLost, Stopped

    try:
        return run(config, stops)
    except PeerLost as e:
        if e.args[0]:
            click.echo(f"Error: {e.args[0]}", err=True)
        leave_without_teardown(1)
    except Stopped as e:
        if int(os.environ.get("WORLD_SIZE", 1)) == 1:
            raise
        click.echo(f"Error: {e}", err=True)
        leave_without_teardown(STOPPED)


def leave_without_teardown(status: int = 0) -> None:
    """End a finished rank of a multi-process run now, skipping the interpreter's teardown: every output is
    written and closed and the ranks have left together. Process groups outlive destroy_process_group() (DeepSpeed
    keeps one in a module global, deepspeed.utils.groups, and one more stays referenced from C++), so their gloo
    threads run into the teardown, where a rank intermittently aborted after a finished run ("terminate called
    without an active exception", exit -6; twice in ~6 test-suite runs), and the launcher then reported the whole
    run as failed."""
    import logging
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@click.command("batch")
@config_option
@data_option
@click.option("--step", type=click.IntRange(min=1), default=None, help="The step, numbered as train logs it (from 1).")
@click.option(
    "--world-size",
    type=click.IntRange(min=1),
    default=None,
    help="Processes of the run (default: WORLD_SIZE, else TP x PP): with the batch sizes, the global batch.",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--json", "as_json", is_flag=True, help='Print {"step": N, "tokens": [[id, ...], ...]} instead of text.')
@click.option(
    "--sources",
    is_flag=True,
    help="Each sample's documents: component, shard, document, token range and input file:line (the source map).",
)
@click.option("--decode", is_flag=True, help="With --sources: the text of each document's range too.")
@click.option(
    "--epochs", is_flag=True, help="Instead of a step: the step at which each train shard begins each of its epochs."
)
@click.option(
    "--chars",
    type=click.IntRange(min=0),
    default=300,
    show_default=True,
    help="Characters of each decoded sample (or, with --sources, of each range) shown.",
)
def batch(config_path, data_dir, step, world_size, overrides, as_json, sources, decode, epochs, chars):
    """The global batch `train` reads at a step: what did the model see, and where did it come from? Every rank's
    samples, in order.

    \b
    neox-data batch --config configs/tiny.yml --data demo-output/shards --step 100
    neox-data batch --config configs/tiny.yml --data demo-output/shards --step 100 --sources --decode
    neox-data batch --config configs/tiny.yml --data demo-output/shards --epochs
    neox-data batch --config configs/20B.yml --data /data/shards --step 1000 --world-size 96 --json > step1000.json
    """
    from trainer.config import load_config

    if (step is None) == (not epochs):
        raise click.UsageError("give --step N (the batch of a step) or --epochs (where each epoch begins)")
    if decode and not sources:
        raise click.UsageError("--decode goes with --sources")
    config = run_reporting_errors(load_config, list(config_path), overrides, {"data_dir": data_dir})
    world_size = config.world_size(world_size)
    if epochs:
        show_epochs(config, world_size, as_json)
    elif sources:
        show_sources(config, step, world_size, as_json, decode, chars)
    else:
        show_batch(config, step, world_size, as_json, chars)


def show_batch(config, step: int, world_size: int, as_json: bool, chars: int) -> None:
    """batch --step: the samples' ids or text, and where their documents start."""
    from trainer.samples import document_starts, global_batch_at, shards_eod, shards_tokenizer

    tokens = run_reporting_errors(global_batch_at, config, step, world_size)
    eod, masked = shards_eod(config.data), config.training.reset_attention_mask
    starts = [document_starts(sample, eod) if eod is not None else None for sample in tokens]
    if as_json:
        shown = {"step": step, "tokens": tokens.tolist()}
        if eod is not None:
            shown |= {"document_starts": starts, "documents_masked": masked}
        click.echo(json.dumps(shown))
        return
    decode = shards_tokenizer(config.data)
    seen = "masked from each other" if masked else "seeing each other"
    for i, sample in enumerate(tokens):
        text = decode(sample.tolist()) if decode else " ".join(map(str, sample.tolist()))
        where = f"; documents start at {', '.join(map(str, starts[i]))}, {seen}" if starts[i] is not None else ""
        click.echo(f"--- step {step} sample {i} ({len(sample)} tokens{where}) ---")
        click.echo(text[:chars] + (" [...]" if len(text) > chars else ""))


def show_sources(config, step: int, world_size: int, as_json: bool, decode: bool, chars: int) -> None:
    """batch --step --sources: each sample's documents and where each came from."""
    from pile_tools.ground import echo_err
    from trainer.provenance import batch_sources
    from trainer.samples import shards_tokenizer

    decoder = shards_tokenizer(config.data) if decode else None
    if decode and decoder is None:
        raise click.UsageError("--decode: no tokenizer (tokenizer_file in the config, or the shards' manifest.json)")
    shown, missing = run_reporting_errors(batch_sources, config, step, world_size, decoder)
    if missing:
        echo_err(
            f"warning: no source map for {missing[0]}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}"
            " (not built by neox-data build-shards, or built before it kept one): file and line are unknown"
        )
    if as_json:
        click.echo(json.dumps(shown))
        return
    for i, sample in enumerate(shown["samples"]):
        click.echo(
            f"--- step {step} sample {i} ({len(sample['tokens'])} tokens, {len(sample['sources'])} documents) ---"
        )
        for row in sample["sources"]:
            where = f"{row['file']}:{row['line']}" if row["file"] else "(no source map)"
            start, end = row["tokens"]
            click.echo(
                f"  {row['component']}  {row['shard']}  document {row['document']}  tokens {start}-{end}  {where}"
            )
            if "text" in row:
                text = row["text"]
                click.echo("    " + repr(text[:chars])[1:-1] + (" [...]" if len(text) > chars else ""))


def show_epochs(config, world_size: int, as_json: bool) -> None:
    """batch --epochs: the step each train shard's epochs begin at."""
    from trainer.provenance import epoch_starts

    rows = run_reporting_errors(epoch_starts, config, world_size)
    if as_json:
        click.echo(json.dumps({"train_iters": config.training.train_iters, "shards": rows}))
        return
    click.echo(f"the run reads {config.training.train_iters:,} steps")
    for row in rows:
        name = row["component"] or row["shard"]
        epochs = ", ".join(f"epoch {k} from step {s:,}" for k, s in enumerate(row["epochs"], 1))
        click.echo(f"{name} ({row['shard']}): {epochs or 'not read'}")


@click.command("evaluate")
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--tasks",
    default="neox_books_wordperplexity,neox_books_lastword",
    show_default=True,
    help="Comma-separated lm-eval tasks (the harness's, e.g. lambada_openai,piqa,hellaswag, need the hub).",
)
@click.option("--num-fewshot", type=int, default=None, help="Examples in each prompt (default: the task's own).")
@click.option("--output", default=None, type=click.Path(dir_okay=False), help="Write the harness's results JSON.")
@click.option("--limit", type=float, default=None, help="At most this many documents per task (a test run).")
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Requests the model scores at once."
)
def evaluate(model, tasks, num_fewshot, output, limit, batch_size):
    """Run the LM Evaluation Harness on an HF directory or a checkpoint (a training run's directory too).

    \b
    neox-data evaluate run --output eval.json
    neox-data evaluate hf --tasks lambada_openai,piqa --num-fewshot 5 --output five-shot.json
    """
    from trainer.evaluate import evaluate as run

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    summary = run_reporting_errors(
        run, model, names, num_fewshot=num_fewshot, output=output, limit=limit, batch_size=batch_size
    )
    for task, metrics in summary.items():
        click.echo(f"{task:<28} " + "  ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))
    if output:
        click.echo(f"results in {output}")


@click.command("decontaminate")
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--against",
    multiple=True,
    required=True,
    metavar="FILE_OR_TASK",
    help="Evaluation text: a .jsonl (each line's text) or .txt file, or an lm-eval task (ours, or the harness's "
    "with its data on disk). Repeat it for several.",
)
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Directory for report.json and .md.")
@click.option(
    "--ngram", type=click.IntRange(min=1), default=13, show_default=True, help="Words per n-gram (lm-eval's 13)."
)
@click.option("--workers", type=click.IntRange(min=0), default=0, help="Scanning processes (default 0: one per CPU).")
def decontaminate(data, against, output, ngram, workers):
    """Which documents of the shards share an n-gram with evaluation text: per task, split and component, with
    the first matches as input file:line. A report; the shards are not changed.

    \b
    neox-data decontaminate demo-output/shards --against neox_books_lastword --output demo-output/contamination
    neox-data decontaminate /data/shards --against lambada_openai --against my_test.jsonl --output contamination
    """
    from trainer.contamination import decontaminate as run

    report = run_reporting_errors(run, data, list(against), output, ngram, workers)
    for name, task in report["tasks"].items():
        click.echo(
            f"{name}: {task['documents']:,} document(s), {task['tokens']:,} tokens share a {ngram}-gram "
            f"with its {task['items']:,} item(s)"
        )
    click.echo(f"report in {output}/report.json and report.md")
