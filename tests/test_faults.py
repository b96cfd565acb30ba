"""A long run loses nothing and lets no fault pass silently: one owner per run directory, checkpoints that verify
(and a fallback when one does not), non-finite values that stop the run, shards checked before step 1, read-only
and full disks, and arguments checked where they are parsed. Every negative case: one clear line, no traceback."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, SAMPLE, SMALL, TINY, Cli, assert_clean_error, losses, neox, train

import pile_tools.runlock as runlock
from pile_tools.checksums import verify_directory
from pile_tools.ground import InputError
from pile_tools.runlock import RunLock
from trainer import data_only
from trainer.checkpoint import machine, machine_share
from trainer.stopping import STOPPED


def command(*args) -> list[str]:
    return [sys.executable, "-m", "cli", *map(str, args)]


def fails(result: subprocess.CompletedProcess, *phrases: str) -> None:
    assert result.returncode != 0, result.stdout + result.stderr
    assert_clean_error(result.stdout + result.stderr, *phrases)


def latest_verifies(run: Path) -> bool:
    """`latest` is absent (no checkpoint yet) or names a checkpoint whose every file matches its checksums."""
    if not (run / "latest").is_file():
        return True
    return verify_directory(run / (run / "latest").read_text().strip()) == []


# Finding 1: a --save holding a run, given without --load, is refused; the run still loads and exports.
def test_reusing_a_save_without_load_is_refused_and_loses_nothing(shards, straight, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in straight.rglob("*")}
    again = train("--data", shards, "--save", straight, *SMALL, "--set", "train_iters=4", check=False)
    fails(again, f"--save {straight} holds a run at step 6: add --load {straight}")
    assert {p.name: p.stat().st_mtime_ns for p in straight.rglob("*")} == before
    assert latest_verifies(straight) and (straight / "latest").read_text() == "global_step6"
    Cli().ok("export-hf", straight, "--output", tmp_path / "hf")


def test_a_checkpoint_of_another_model_shape_is_refused_naming_what_differs(shards, straight, tmp_path):
    """--load of a checkpoint whose weights have other shapes: one line naming them, before any process group."""
    smaller = ["--set", "hidden_size=32"]
    other = train("--data", shards, "--save", tmp_path / "r", "--load", straight, *SMALL, *smaller, check=False)
    fails(other, "the checkpoint's model has hidden_size 64 (this run: 32)", "load it with the model it was trained")
    padded = ["--set", "make_vocab_size_divisible_by=256"]
    vocab = train("--data", shards, "--save", tmp_path / "r", "--load", straight, *SMALL, *padded, check=False)
    fails(vocab, "padded_vocab_size 50,304 (this run: 50,432)", "it x model_parallel_size divides 50,304")


# Finding 2: a second run on one --save is refused naming the holder; a dead holder's lock is taken over.
def test_a_second_run_on_the_same_save_is_refused_and_a_dead_ones_lock_is_taken_over(shards, tmp_path):
    run = tmp_path / "run"
    args = [
        *TINY,
        "--data",
        shards,
        "--save",
        run,
        *SMALL,
        "--set",
        "train_iters=100000",
        "--set",
        "save_interval=0",
        "--set",
        "eval_interval=0",
    ]
    first = subprocess.Popen(command(*args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / ".lock").is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert (run / ".lock").is_file(), first.stderr.read() if first.poll() is not None else "no lock in 120 s"
        second = train("--data", shards, "--save", run, "--load", run, *SMALL, check=False)
        fails(second, f"{run} is in use by another run: pid {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = train("--data", shards, "--save", run, "--load", run, *SMALL, "--set", "train_iters=1")
    assert "taking over the lock of a run that ended without releasing it" in third.stderr
    assert not (run / ".lock").exists()  # released at the end


def corrupt_middle(path: Path, size: int = 1 << 20) -> None:
    """Overwrite `size` bytes in the middle of a file with 0xFF, as a failing disk or a bad copy would."""
    n = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(n // 2)
        f.write(b"\xff" * min(size, n // 4))


# Finding 3 and the acceptance's corrupted checkpoint: export fails naming the file; --load falls back.
def test_a_corrupt_checkpoint_is_refused_and_train_falls_back_to_the_previous_one(shards, straight, tmp_path):
    run = tmp_path / "run"
    train("--data", shards, "--save", run, *SMALL)
    assert "2 checkpoint(s)" in neox("verify", run).stdout  # global_step4 and 6: keep_last_n_checkpoints 2
    largest = max((run / "global_step6").iterdir(), key=lambda p: p.stat().st_size if p.is_file() else 0)
    corrupt_middle(largest)
    fails(neox("verify", run, check=False), f"{largest}: content differs", "1 problem(s)")
    (run / "latest").write_text("global_step8")
    fails(neox("verify", run / "global_step4", run, check=False), "latest: names global_step8", "2 problem(s)")
    (run / "latest").write_text("global_step6")
    fails(neox("export-hf", run, "--output", tmp_path / "hf", check=False), f"{largest}: content differs")
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    resumed = train("--data", shards, "--save", run, "--load", run, *SMALL)
    assert "global_step6 does not verify" in resumed.stderr and "resuming from" in resumed.stderr
    assert losses(run) == losses(straight)  # steps 5 and 6 again, from global_step4: bitwise the same losses
    assert latest_verifies(run) and (run / "global_step4").is_dir()  # the checkpoint fallen back to is kept
    assert neox("verify", run).stdout.rstrip().endswith(": ok")


# Steps across a power of ten (5, 10, 15): ordered by name, the fallback would take global_step5 and the pruning
# would delete global_step10.
ACROSS = [*SMALL, "--set", "train_iters=15", "--set", "save_interval=5", "--set", "eval_interval=0"]


def test_the_fallback_takes_the_newest_checkpoint_by_step_not_by_name(shards, tmp_path):
    run = tmp_path / "run"
    train("--data", shards, "--save", run, *ACROSS, "--set", "keep_last_n_checkpoints=10")
    assert sorted(p.name for p in run.glob("global_step*")) == ["global_step10", "global_step15", "global_step5"]
    corrupt_middle(run / "global_step15" / "mp_rank_00_model_states.pt")
    resumed = train("--data", shards, "--save", run, "--load", run, *ACROSS, "--set", "train_iters=16")
    assert f"resuming from {run / 'global_step10'}, the newest checkpoint that verifies" in resumed.stderr
    assert [s for s, _ in losses(run)][-6:] == [11, 12, 13, 14, 15, 16]


def test_pruning_keeps_the_newest_checkpoints_by_step_not_by_name(shards, tmp_path):
    run = tmp_path / "run"
    train("--data", shards, "--save", run, *ACROSS)  # keep_last_n_checkpoints: 2
    assert sorted(p.name for p in run.glob("global_step*")) == ["global_step10", "global_step15"]


# Finding 3, the rest: non-finite values end the run, and never reach a checkpoint.
def test_non_finite_losses_stop_the_run_without_a_checkpoint(shards, tmp_path):
    hot = ["--set", "lr=1.0e+6", "--set", "gradient_clipping=0.0", "--set", "train_iters=40"]
    stopped = train("--data", shards, "--save", tmp_path / "a", *SMALL, *hot, "--set", "save_interval=0", check=False)
    fails(stopped, "3 optimizer steps in a row were not finite")
    saving = train("--data", shards, "--save", tmp_path / "b", *SMALL, *hot, check=False)
    fails(saving, "the weights or optimizer states hold nan or inf; not saving")
    assert not list((tmp_path / "a").glob("global_step*")) and not (tmp_path / "b" / "latest").exists()


def copy_shards(shards: Path, dest: Path) -> Path:
    import shutil

    return Path(shutil.copytree(shards, dest, ignore=shutil.ignore_patterns("index-cache")))


# Finding 4: shards are checked before step 1; a bad id at run time names the shard and document.
def test_a_truncated_shard_is_refused_before_any_work(shards, tmp_path):
    bad = copy_shards(shards, tmp_path / "bad")
    bin_path = bad / "train" / "github.bin"
    os.truncate(bin_path, bin_path.stat().st_size - 1000)
    fails(train("--data", bad, "--save", tmp_path / "run", *SMALL, check=False), f"{bin_path}: ", "truncated")
    assert not (tmp_path / "run").exists()
    fails(neox("inspect", bad, check=False), "CORRUPT", "train/github")
    fails(neox("verify", bad, check=False), "train/github", "truncated")


@pytest.mark.parametrize("token", [60000, 50290])
def test_an_id_outside_the_vocabulary_is_an_error_naming_shard_and_document(shards, tmp_path, token):
    bad = copy_shards(shards, tmp_path / "bad")
    for path in bad.glob("train/*.bin"):
        tokens = np.memmap(path, np.uint16, "r+")
        tokens[:] = token
        tokens.flush()
    result = train("--data", bad, "--save", tmp_path / "run", *SMALL, check=False)
    fails(result, f"holds token id {token:,}, outside the vocabulary (50,277 ids)", "document ")
    assert "IndexError" not in result.stderr
    fails(
        neox("verify", bad, check=False),
        f"token id {token:,} at position 0 is outside the vocabulary",
        "content differs from the checksum in manifest.json",
    )


def test_verify_passes_good_shards_and_names_a_missing_eod(shards, tmp_path):
    ok = neox("verify", shards)
    assert ok.stdout.strip().endswith(": ok")
    bad = copy_shards(shards, tmp_path / "bad")
    from pile_tools.indexed import Shard

    shard = Shard(bad / "valid" / "github")
    end = (int(shard.pointers[1]) // 2) + int(shard.sizes[1]) - 1  # the last token of document 1
    tokens = np.memmap(bad / "valid" / "github.bin", np.uint16, "r+")
    tokens[end] = 1
    tokens.flush()
    fails(neox("verify", bad, check=False), "valid/github: document 1 does not end with the EOD id 0")


# Finding 5: import-hf reads model_type first.
@pytest.mark.parametrize("tied", [False, True])
def test_import_hf_refuses_a_model_that_is_not_gpt_neox(tmp_path, tied):
    hf = tmp_path / "gpt2"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768, "tie_word_embeddings": tied}))
    result = Cli()("import-hf", hf, "--output", tmp_path / "out")
    assert result.exit_code == 1
    assert_clean_error(result.output, "model_type 'gpt2', not a GPT-NeoX model")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def mount(tmp_path):
    """mount(options, path): a tmpfs or a bind mount there, unmounted afterwards; skipped where mounting is not
    allowed (tests run as root here and in CI, where chmod alone does not stop a write)."""
    mounted = []

    def do(args: list[str], path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", *args, str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount here: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield do
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def read_only_copy(mount, source: Path, where: Path) -> Path:
    mount(["--bind", str(source)], where)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(where)], check=True)
    assert not os.access(where, os.W_OK)
    return where


# Finding 6: shards on a read-only filesystem train, with the index cache under --save.
def test_shards_on_a_read_only_filesystem_train_with_the_cache_under_save(shards, tmp_path, mount):
    data = copy_shards(shards, tmp_path / "data")
    ro = read_only_copy(mount, data, tmp_path / "ro")
    before = sorted(p.name for p in data.rglob("*"))
    train("--data", ro, "--save", tmp_path / "run", *SMALL, "--set", "train_iters=2")
    assert sorted(p.name for p in data.rglob("*")) == before  # nothing written beside the shards
    assert list((tmp_path / "run" / "index-cache").glob("*_doc_idx.npy"))


# Finding 7: a full disk and read-only outputs: one line, no traceback, nothing that looks complete.
def test_a_full_disk_gives_one_line_and_nothing_that_looks_complete(shards, tmp_path, mount):
    small = mount(["-t", "tmpfs", "-o", "size=1m", "tmpfs"], tmp_path / "small")
    out = small / "shards"
    built = neox("build-shards", SAMPLE, "--tokenizer", "gpt-neox-20b", "--output", out, "--workers", 1, check=False)
    fails(built, "no space left on device while writing", str(small))
    assert not (out / "manifest.json").exists() and not (out / "blend.json").exists()
    disk = mount(["-t", "tmpfs", "-o", "size=40m", "tmpfs"], tmp_path / "disk")
    trained = train("--data", shards, "--save", disk / "run", *SMALL, check=False)
    fails(trained, "no space left on device while writing", str(disk / "run" / "global_step2"))
    assert not (disk / "run" / "latest").exists()


def test_read_only_outputs_fail_before_the_work(shards, straight, tmp_path, mount):
    (tmp_path / "empty").mkdir()
    ro = read_only_copy(mount, tmp_path / "empty", tmp_path / "ro")
    for args in (
        ["compare-tokenizers", SAMPLE, "--tokenizer", "gpt2", "--output", ro / "cmp"],
        ["export-hf", straight, "--output", ro / "hf"],
        ["train-tokenizer", SAMPLE, "--output", ro / "tok", "--vocab-size", "1000"],
        ["build-shards", SAMPLE, "--tokenizer", "gpt2", "--output", ro / "shards"],
        [*TINY, "--data", shards, "--save", ro / "run", *SMALL],
    ):
        fails(neox(*args, check=False), "read-only file system while writing", str(ro))


# Finding 8 and 10: arguments and config values are checked where they are parsed.
@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "optimizer=abc"], "--set optimizer='abc': optimizer is a mapping"),
        (["--set", "zero_optimization=[1"], "--set 'zero_optimization=[1': the value is not valid YAML"),
        (["--set", "seq_length=0"], "seq_length: must be at least 1, got 0"),
        (["--set", "num_layers=0"], "num_layers: must be at least 1, got 0"),
        (["--set", "train_iters=-5"], "train_iters: must be at least 1, got -5"),
        (["--set", "train_micro_batch_size_per_gpu=0"], "train_micro_batch_size_per_gpu: must be at least 1, got 0"),
        (["--set", "seq_length=256"], "seq_length 256 exceeds max_position_embeddings 128"),
        (["--set", "train_iter=2"], "--set train_iter: unknown key; did you mean train_iters?"),
    ],
)
def test_bad_arguments_fail_where_they_are_parsed(tmp_path, args, message):
    result = Cli()("train", "--config", ROOT / "configs" / "tiny.yml", "--data", tmp_path, *args)
    assert result.exit_code == 1
    assert_clean_error(result.output, message)


def test_out_of_range_options_are_refused(tmp_path, straight):
    build = ["build-shards", SAMPLE, "--tokenizer", "gpt2", "--output", tmp_path / "o"]
    for args in (
        ["generate", straight, "--prompt-ids", "1", "--max-new-tokens", "-1"],
        [*build, "--workers", "0"],
        [*build, "--workers", "-1"],
    ):
        result = Cli()(*args)
        assert result.exit_code == 2 and "is not in the range" in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_unknown_keys_in_a_config_file_are_one_warning_line(tmp_path):
    config = tmp_path / "c.yml"
    config.write_text((ROOT / "configs" / "tiny.yml").read_text() + "wandb_team: x\nsome_new_key: 1\n")
    result = Cli()("plan", "--config", config)
    assert result.exit_code == 0
    lines = [line for line in result.output.splitlines() if "unknown config keys" in line]
    assert lines == ["warning: unknown config keys, ignored: some_new_key, wandb_team"]
    assert "warnings.warn" not in result.output


def test_a_deleted_rng_file_falls_back_to_the_previous_checkpoint(shards, straight, tmp_path):
    import shutil

    run = Path(shutil.copytree(straight, tmp_path / "run"))
    (run / "global_step6" / "rng_state_0.pt").unlink()
    resumed = train("--data", shards, "--save", run, "--load", run, *SMALL)
    assert "rng_state_0.pt: missing" in resumed.stderr and "resuming from" in resumed.stderr
    assert losses(run) == losses(straight)


KILLER = """
import os, signal, sys
point, count = os.environ["KILL_AT"].split(":")
calls = [0]
def die_on(module, name):
    real = getattr(module, name)
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(count):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    setattr(module, name, wrapped)
import deepspeed, torch, pile_tools.checksums, pile_tools.rundir, trainer.checkpoint, trainer.train
target = {
    "start-up": (deepspeed, "initialize"),  # the engine being built, the lock held
    "step": (trainer.train.Trainer, "train_step"),  # the k-th training step of this run, before it runs
    "evaluation": (trainer.train.Trainer, "evaluate"),
    "torch.save": (torch, "save"),  # inside a save: DeepSpeed's files, the RNG states
    "hash": (trainer.checkpoint, "hash_files"),  # a save's hashing (a resume's verification hashes too)
    "checksums": (trainer.checkpoint, "write_checksums"),
    "latest": (pile_tools.rundir, "write_text"),
}[point]
die_on(*target)
import cli
cli.main(sys.argv[1:])
"""

LONG = [*SMALL, "--set", "train_iters=100", "--set", "save_interval=5", "--set", "eval_interval=25"]


RECORDER = """
import json, os, shutil, sys
import torch, pile_tools.rundir, trainer.checkpoint
log = open(os.environ["EVENTS"], "a", buffering=1)
def record(module, name, describe):
    real = getattr(module, name)
    def wrapped(*args, **kwargs):
        log.write(json.dumps(describe(*args, **kwargs)) + "\\n")
        return real(*args, **kwargs)
    setattr(module, name, wrapped)
record(os, "sync", lambda: ["sync"])
record(os, "fsync", lambda fd: ["fsync", os.readlink(f"/proc/self/fd/{fd}")])
record(torch, "save", lambda obj, f, *args, **kwargs: ["save", str(f)])
record(trainer.checkpoint, "write_text", lambda path, text, durable=False: ["write", str(path), durable])
record(pile_tools.rundir, "write_text", lambda path, text, durable=False: ["write", str(path), durable])
record(shutil, "rmtree", lambda path, *args, **kwargs: ["rmtree", str(path)])
import cli
cli.main(sys.argv[1:])
"""


def test_a_checkpoint_is_on_the_disk_before_latest_names_it_or_an_older_one_is_pruned(shards, tmp_path):
    """A power cut loses what is only in the page cache: were `latest` renamed, or an older checkpoint pruned,
    before the new one's files reached the disk, the run could be left with no checkpoint that loads. Every save
    fsyncs each of its files and directories after the last write, then writes `latest` durably, then prunes; it
    never waits for the whole page cache (os.sync)."""
    run, events = tmp_path / "run", tmp_path / "events.jsonl"
    args = [*TINY, "--data", shards, "--save", run, *SMALL]
    subprocess.run(
        [sys.executable, "-c", RECORDER, *map(str, args)],
        cwd=ROOT,
        env={**os.environ, "EVENTS": str(events)},
        check=True,
    )
    log = [json.loads(line) for line in events.read_text().splitlines()]
    latest = [i for i, e in enumerate(log) if e[0] == "write" and e[1] == str(run / "latest")]
    pruned = [i for i, e in enumerate(log) if e[0] == "rmtree" and e[1] == str(run / "global_step2")]
    assert len(latest) == 3 and len(pruned) == 1 and all(log[i][2] for i in latest)  # steps 2, 4, 6; keep 2
    assert ["sync"] not in log
    for i, tag in [*zip(latest, ["global_step2", "global_step4", "global_step6"]), (pruned[0], "global_step6")]:
        last_save = max(j for j in range(i) if log[j][0] == "save")
        synced = {e[1] for e in log[last_save:i] if e[0] == "fsync"}
        files = json.loads((run / tag / "checksums.json").read_text())["files"] if tag != "global_step2" else {}
        directories = {str(run / tag / d) for d in ("", "universal", "universal/embed_out", "tokenizer")}
        assert {str(run), *directories, *(str(run / tag / name) for name in files)} <= synced, (tag, synced)
        assert any(name.startswith(str(run / tag / "mp_rank_00")) for name in synced), (tag, synced)


FAILING_WRITE_BACK = """
import errno, os, sys
real = os.fsync
def fsync(fd):
    if os.environ["FAILING"] in os.readlink(f"/proc/self/fd/{fd}"):
        raise OSError(errno.EIO, "Input/output error")
    return real(fd)
os.fsync = fsync
import cli
cli.main(sys.argv[1:])
"""


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "universal/embed_out/__0_0.distcp"])
def test_a_checkpoint_the_disk_could_not_write_back_is_an_error_and_never_latest(shards, tmp_path, name):
    """The disk fails to write back a checkpoint's pages (EIO; ENOSPC on a filesystem that allocates late), in
    DeepSpeed's files (which os.sync() would have let pass silently, naming the checkpoint latest) or in the
    universal copy (whose writer raises a BaseException of its own): one line naming the checkpoint, exit
    non-zero, the half-written checkpoint removed, `latest` still the previous one."""
    run = tmp_path / "run"
    args = [*TINY, "--data", shards, "--save", run, *SMALL]
    env = {**os.environ, "FAILING": f"/global_step4/{name}"}
    done = subprocess.run(
        [sys.executable, "-c", FAILING_WRITE_BACK, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    fails(done, f"input/output error while writing {run / 'global_step4'}")
    assert (run / "latest").read_text() == "global_step2" and latest_verifies(run)
    assert not (run / "global_step4").exists()


def test_each_machines_ranks_share_out_all_the_files_to_sync():
    """Every machine syncs every file (another machine's fsync does not reach its page cache), its ranks splitting
    them: rank 4 is the third of machine a's three ranks."""
    machines = ["a", "a", "b", "b", "a"]
    assert [machine_share(machines, r) for r in range(5)] == [(0, 3), (1, 3), (0, 2), (1, 2), (2, 3)]
    assert machine() == machine() != ""


# Where the SIGKILLs land: each kind of moment, in a seeded order, the call it lands on drawn small enough that
# every kill meets a live process (a save-phase kill within the run's next 2 saves, 10 steps; a step kill within 4
# steps; an evaluation within 25): the 10 runs take at most 87 of the 100 steps, so none finishes before its kill.
MOMENTS = [
    ("start-up", (1, 1)),
    ("step", (1, 4)),
    ("step", (1, 4)),
    ("step", (1, 4)),
    ("evaluation", (1, 1)),
    ("torch.save", (1, 2)),
    ("hash", (1, 2)),
    ("checksums", (1, 2)),
    ("latest", (1, 2)),
    ("torch.save", (1, 2)),
]


@pytest.mark.slow
def test_sigkill_at_chosen_moments_never_loses_a_checkpoint_and_resumes_exactly(shards, tmp_path):
    """10 SIGKILLs, each at a moment the run reaches for sure: start-up, a training step, an evaluation, or inside
    a save (torch.save, hashing, checksums.json, `latest`), each followed by --load: `latest` always verifies, and
    the losses and weights equal an uninterrupted run's. The kills land by construction (the run kills itself at
    the named call), never by the clock, so a loaded machine changes nothing."""
    reference = tmp_path / "reference"
    train("--data", shards, "--save", reference, *LONG)
    run, rng = tmp_path / "run", random.Random(11)
    args = [*TINY, "--data", shards, "--save", run, "--load", run, *LONG]
    moments = rng.sample(MOMENTS, len(MOMENTS))
    for point, (low, high) in moments:
        env = {**os.environ, "KILL_AT": f"{point}:{rng.randint(low, high)}"}
        done = subprocess.run(
            [sys.executable, "-c", KILLER, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert done.returncode == -signal.SIGKILL, (point, done.returncode, done.stderr[-2000:])
        assert latest_verifies(run), f"after a kill at {point}, latest does not verify"
    assert losses(run)[-1][0] < 100  # no run finished before its kill
    neox(*args)
    assert losses(run) == losses(reference)
    assert (run / "latest").read_text() == "global_step100" and latest_verifies(run)
    a = data_only.load(run / "global_step100" / "mp_rank_00_model_states.pt")["module"]
    b = data_only.load(reference / "global_step100" / "mp_rank_00_model_states.pt")["module"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_written_before_checksums_still_load_with_a_note(shards, straight, tmp_path):
    import shutil

    run = Path(shutil.copytree(straight, tmp_path / "run"))
    for path in run.glob("global_step*/checksums.json"):
        path.unlink()
    fails(neox("verify", run, check=False), f"{run}: checkpoints without checksums.json (saved before they carried")
    exported = neox("export-hf", run, "--output", tmp_path / "hf")
    assert "written before checkpoints carried checksums: not verified" in exported.stderr
    resumed = train("--data", shards, "--save", run, "--load", run, *SMALL, "--set", "train_iters=7")
    assert "written before checkpoints carried checksums: loaded unverified" in resumed.stderr
    assert losses(run)[-1][0] == 7 and latest_verifies(run)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_preemption_signal_saves_the_current_step_and_stops(shards, tmp_path, signum):
    """Slurm's SIGTERM (preemption, time limit) or SIGUSR1 (--signal warning): the step finishes, is saved even
    off the save interval, and the run stops with one line naming the checkpoint; --load goes on from there."""
    run = tmp_path / "run"
    steps = [*SMALL, "--set", "train_iters=400", "--set", "save_interval=1000", "--set", "eval_interval=0"]
    args = [*TINY, "--data", shards, "--save", run, *steps]
    proc = subprocess.Popen(command(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").is_file() or len(losses(run)) < 3:
        assert proc.poll() is None and time.time() < deadline, "the run ended before the signal"
        time.sleep(0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    step = losses(run)[-1][0]
    assert proc.returncode == STOPPED and 3 <= step < 400
    assert_clean_error(out + err, f"stopped by {signal.Signals(signum).name} after step {step}", f"--load {run}")
    assert (run / "latest").read_text() == f"global_step{step}" and latest_verifies(run)
    resumed = train("--data", shards, "--save", run, "--load", run, *steps[:-6], "--set", f"train_iters={step + 2}")
    assert resumed.returncode == 0 and [s for s, _ in losses(run)][-3:] == [step, step + 1, step + 2]


SIGNAL_IN_THE_LAST_STEP = """
import os, signal, sys
from trainer.train import Trainer
step = Trainer.train_step
def signalled(self):  # Slurm's warning, during the run's last step
    if self.step == self.config.training.train_iters - 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    return step(self)
Trainer.train_step = signalled
import cli
cli.main(sys.argv[1:])
"""


def test_a_stop_signal_in_the_last_step_lets_the_run_end_as_planned(shards, straight, tmp_path):
    """Nothing is left to resume after the last step: the run saves it, makes its final evaluation and exits 0 (a
    requeue would find nothing to train, and the final evaluation would never be made), bitwise the straight run."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-c", SIGNAL_IN_THE_LAST_STEP, *TINY, "--data", shards, "--save", run, *SMALL]
    done = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SIGUSR1 after the last step: step 6 is saved; the run ends with its final evaluation" in done.stdout
    assert "stopped by" not in done.stdout + done.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows if r["kind"] != "train"][-2:] == [("valid", 6), ("test", 6)]
    assert losses(run) == losses(straight)
    assert (run / "latest").read_text() == "global_step6" and latest_verifies(run)


@pytest.mark.slow
def test_rank_0_lost_ends_the_other_rank_in_seconds_with_one_line(shards, tmp_path):
    """Two ranks started as srun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT; no launcher to end the others),
    rank 0 SIGKILLed mid-run: rank 1 finds the rendezvous store rank 0 held gone and says so in one line, without
    a checkpoint or a traceback, in seconds (tests/test_slurm.py loses rank 1, whose loss rank 0 names)."""
    from trainer.engine import free_port

    run = tmp_path / "run"
    steps = [*SMALL, "--set", "train_iters=400", "--set", "save_interval=1000", "--set", "eval_interval=0"]
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WORLD_SIZE": "2"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    args = command(*TINY, "--data", shards, "--save", run, *steps, "--set", "train_micro_batch_size_per_gpu=2")
    ranks = [
        subprocess.Popen(args, cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for r in (0, 1)
    ]  # fmt: skip
    deadline = time.time() + 180
    while not (run / "metrics.jsonl").is_file() or len(losses(run)) < 3:
        assert all(r.poll() is None for r in ranks) and time.time() < deadline, "a rank ended before the kill"
        time.sleep(0.2)
    ranks[0].kill()
    killed = time.monotonic()
    out = ranks[1].communicate(timeout=120)[0]
    ranks[0].communicate(timeout=30)
    lines = [line for line in out.splitlines() if "was lost" in line]
    assert ranks[1].returncode not in (0, STOPPED) and time.monotonic() - killed < 60, out[-3000:]
    assert len(lines) == 1, out[-3000:]
    assert lines[0].startswith("Error: rank 1: rank 0 was lost (the run's rendezvous store it held at ")
    assert f"127.0.0.1:{port} does not answer" in lines[0] and "resume from the last one with --load" in lines[0]
    assert "Traceback" not in out and not (run / "latest").exists()


TAKE_OVER = """
import sys, time
import pile_tools.runlock as runlock
from pathlib import Path
alive = runlock.holder_alive
runlock.holder_alive = lambda holder: time.sleep(1.0) or alive(holder)  # widen the window between read and unlink
try:
    with runlock.RunLock(Path(sys.argv[1])):
        time.sleep(2.0)
    print("held")
except runlock.InputError as e:
    print("refused:", e)
"""


def test_two_runs_taking_over_one_stale_lock_at_once_do_not_both_win(tmp_path):
    """A dead run's lock found by two new runs at the same moment: one takes it over, the other is refused."""
    stale = {"host": socket.gethostname(), "pid": 999999999, "create_time": 0}
    (tmp_path / ".lock").write_text(json.dumps(stale))
    procs = [
        subprocess.Popen([sys.executable, "-c", TAKE_OVER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outcomes = sorted(p.communicate(timeout=60)[0].strip().split(":")[0] for p in procs)
    assert outcomes == ["held", "refused"]


def test_a_lock_held_on_another_host_is_refused_while_touched_and_taken_over_once_stale(tmp_path, monkeypatch):
    """A process on another host cannot be checked from here: its lock, touched by a heartbeat, is refused while
    fresh and taken over with a warning once untouched for STALE_S (its node died; the run was requeued)."""
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"host": "another-node", "pid": 12345, "started": time.time(), "create_time": 0}))
    with pytest.raises(InputError, match=r"in use by the run of pid 12345 on another-node, .*, alive \d+ s ago"):
        with RunLock(tmp_path):
            pass
    stale = time.time() - runlock.STALE_S - 30
    os.utime(lock, (stale, stale))
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    with pytest.warns(UserWarning, match=r"taking over the lock of a run that left it untouched for 2\d\d s"):
        with RunLock(tmp_path) as held:
            assert json.loads(lock.read_text())["pid"] == os.getpid()
            os.utime(lock, (stale, stale))
            deadline = time.time() + 60
            while held.age() > 30:  # the holder's heartbeat touches it again
                assert time.time() < deadline, "the lock was not touched in 60 s"
                time.sleep(0.05)
    assert not lock.exists() and not (tmp_path / ".lock.guard").exists()
