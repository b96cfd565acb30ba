"""The command line as a user meets it: every --help, and inspect on a real build."""

import os
import subprocess
import sys

import click
import pytest
from helpers import NEOX

import cli


@pytest.mark.parametrize("command", [[], *([name] for name in cli.main.commands)])
def test_help(run, command):
    result = run.ok(*command, "--help")
    assert "Usage:" in result.output


@pytest.mark.parametrize("name", sorted(cli.main.commands))
def test_help_starts_with_examples_and_explains_every_option(run, name):
    text = run.ok(name, "--help").output
    description = text.split("Options:")[0]
    assert f"neox-data {name} " in description, text  # a real example, before the options
    command = cli.main.commands[name]
    bare = [p.name for p in command.params if isinstance(p, click.Option) and not p.hidden and not p.help]
    assert not bare, f"options without help: {bare}"


def test_top_level_list_shows_whole_summaries(run):
    text = " ".join(run.ok("--help").output.split())
    for name, command in cli.main.commands.items():
        assert " ".join(command.help.strip().split("\n")[0].split()) in text, name


def test_build_help_warns_that_released_pile_is_upsampled(run):
    assert "ALREADY upsampled" in " ".join(run.ok("build-shards", "--help").output.split())


def test_help_is_instant_without_heavy_imports():
    heavy = "('torch', 'tokenizers', 'numpy', 'deepspeed')"
    code = (
        f"import sys, cli; cli.main(['--help'], standalone_mode=False); print([m for m in {heavy} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]")


@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_openmp_threads_sleep_while_waiting_unless_the_user_says_otherwise(given):
    """Spinning OpenMP threads halve a CPU run's speed beside other work: the commands' processes load torch with
    OMP_WAIT_POLICY=PASSIVE, which libgomp reads once as it loads, unless the user chose a policy."""
    code = "import os, cli, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | (
        {"OMP_WAIT_POLICY": given} if given else {}
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == (given or "PASSIVE")


def test_inspect_counts_checks_and_decodes(corpus, tmp_path, run):
    out = tmp_path / "out"
    run.ok("build-shards", corpus, "--tokenizer", NEOX, "--output", out, "--split", "1,0,0")
    result = run.ok("inspect", out, "--decode", 1, "--chars", 60)
    rows = [line.split() for line in result.output.splitlines() if line.startswith("train/")]
    assert ["train/dm-mathematics", "uint16"] in [row[:2] for row in rows] and all(row[-1] == "ok" for row in rows)
    assert "document 0" in result.output and "Solve" in result.output
    one = run.ok("inspect", out / "train" / "fortunes.idx")
    assert "train/fortunes" in one.output or "fortunes" in one.output
    with open(out / "train" / "fortunes.bin", "ab") as f:
        f.write(b"\0\0")
    corrupt = run("inspect", out)
    assert (
        corrupt.exit_code == 1
        and "CORRUPT" in corrupt.output
        and "1 corrupt shard(s): train/fortunes" in corrupt.output
    )
    missing = run("inspect", tmp_path / "nothing")
    assert missing.exit_code == 1 and "no .bin/.idx shards" in missing.output


def test_inspect_warns_when_decoding_with_another_tokenizer(corpus, tmp_path, run):
    out = tmp_path / "out"
    run.ok("build-shards", corpus, "--tokenizer", NEOX, "--output", out, "--split", "1,0,0")
    other = run.ok("inspect", out, "--decode", 1, "--tokenizer", "gpt2").output
    assert "warning: --tokenizer gpt2 is not the tokenizer these shards were built with" in other
    assert "not the tokenizer" not in run.ok("inspect", out, "--decode", 1).output


def test_plan_reads_a_small_run_in_small_units(run):
    out = run.ok("plan", "--config", "configs/tiny.yml").output
    assert "layout              1 GPU = TP 1" in out
    run_line = next(line for line in out.splitlines() if line.startswith("run"))
    assert "204.8K tokens" in run_line and "seconds" in run_line and "0.00 GPU-hours" in run_line
    assert "checkpoints         2 saved, 318.6 MB each (DeepSpeed's files 159.3 MB + universal copy 159.3 MB)" in out
