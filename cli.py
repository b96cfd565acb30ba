"""The `neox-data` command: attaches each package's commands, nothing else."""

import click

from pile_tools.commands import build_shards, inspect_shards, merge_shards, verify_shards
from pile_tools.ground import whole_summaries
from tokenizer.commands import compare_tokenizers, train_tokenizer
from trainer.commands import batch, decontaminate, evaluate, export_hf, generate, import_hf, plan, train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="neox-data")
@click.option("--local_rank", "--local-rank", type=int, hidden=True, help="Set by the deepspeed launcher; unused.")
def main(local_rank):
    """GPT-NeoX-20B's data and training recipe: tokenizer, Pile shards, model, trainer."""


main.add_command(build_shards)
main.add_command(merge_shards)
main.add_command(inspect_shards)
main.add_command(verify_shards)
main.add_command(train_tokenizer)
main.add_command(compare_tokenizers)
main.add_command(plan)
main.add_command(export_hf)
main.add_command(import_hf)
main.add_command(generate)
main.add_command(train)
main.add_command(batch)
main.add_command(evaluate)
main.add_command(decontaminate)
whole_summaries(main)

if __name__ == "__main__":
    main()
