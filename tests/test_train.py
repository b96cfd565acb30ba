"""neox-data train on CPU: exact resume, a save killed midway, 2-process data parallelism, export of a training
checkpoint, and bad configs that fail before any work."""

import json
import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import NEOX, ROOT, SMALL, TINY, Cli, assert_clean_error, assert_same_losses, launch, layout, losses, train

from trainer import data_only


def weights(run: Path, tag: str) -> dict:
    return data_only.load(run / tag / "mp_rank_00_model_states.pt")["module"]


def test_resume_gives_the_same_losses_and_weights(shards, straight, tmp_path):
    run = tmp_path / "run"
    train("--data", shards, "--save", run, *SMALL, "--set", "exit_interval=3")
    assert (run / "latest").read_text() == "global_step3" and len(losses(run)) == 3
    resumed = train("--data", shards, "--save", run, "--load", run, *SMALL)
    assert "data order" not in resumed.stderr  # the same settings read the samples the run read
    assert losses(run) == losses(straight)  # bitwise, every step
    a, b = weights(run, "global_step6"), weights(straight, "global_step6")
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = data_only.load(run / "global_step6" / "mp_rank_00_model_states.pt")
    assert state["consumed_samples"] == 6 * 4 and state["iteration"] == 6
    assert sorted(p.name for p in run.glob("global_step*")) == ["global_step4", "global_step6"]  # keep_last_n: 2
    assert (run / "loss.png").stat().st_size > 0 and (run / "global_step6" / "tokenizer" / "tokenizer.json").is_file()


def test_a_finished_run_trains_nothing_and_a_resume_on_other_data_says_what_changed(shards, straight, tmp_path):
    """A requeued job whose run is done exits at once, evaluating and recording nothing; a resume whose settings
    give the loaded step other samples than the run read (here another seed) warns, naming the change."""
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    metrics = (run / "metrics.jsonl").read_bytes()
    done = train("--data", shards, "--save", run, "--load", run, *SMALL)
    assert f"nothing to train: {run / 'global_step6'} is at step 6 (train_iters 6)" in done.stdout
    assert "train loss" not in done.stdout and (run / "metrics.jsonl").read_bytes() == metrics
    state = data_only.load(run / "global_step6" / "mp_rank_00_model_states.pt")
    assert state["data_order"]["step"] == 6 and state["data_order"]["seed"] == 1234
    longer = ["--set", "train_iters=7", "--set", "eval_interval=0", "--set", "save_interval=0"]
    other = train("--data", shards, "--save", run, "--load", run, *SMALL, *longer, "--set", "seed=7")
    assert "these settings give step 6 other samples than the run read (seed 1234 -> 7" in other.stderr
    assert "the data order changes from here" in other.stderr and losses(run)[-1][0] == 7


KILL_DURING_SAVE = """
import os, signal, sys, torch
real_save = torch.save
def save(obj, f, *args, **kwargs):
    if "global_step4" in str(f) and "model_states" in str(f):  # half the file, then SIGKILL
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
import cli
cli.main(sys.argv[1:])
"""


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_latest(shards, straight, tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-c",
        KILL_DURING_SAVE,
        *TINY,
        "--data",
        shards,
        "--save",
        run,
        *SMALL,
    ]
    killed = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert (run / "global_step4").is_dir()  # the cut-short save is there...
    assert (run / "latest").read_text() == "global_step2"  # ...but not the latest
    train("--data", shards, "--save", run, "--load", run, *SMALL)
    assert losses(run) == losses(straight)
    assert (run / "latest").read_text() == "global_step6"


TEARDOWN_FAULT = """
import atexit, os, sys
if os.environ.get("RANK") == "1" and "train" in sys.argv:  # a library fault in the interpreter's teardown
    atexit.register(os.abort)
"""


def test_two_processes_match_one_with_the_same_global_batch(shards, straight, tmp_path):
    """DP2 equals one process; and a finished rank ends without the interpreter's teardown, so a fault there (here
    an abort at exit on rank 1, as gloo's threads intermittently caused) cannot fail a finished run."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(TEARDOWN_FAULT)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    launch(2, "--data", shards, "--save", tmp_path / "run", *SMALL, *layout(1, 1, 2), env=env)
    assert_same_losses(straight, tmp_path / "run", 1e-5)


def test_export_of_a_training_run_loads_in_transformers(straight, tmp_path, run):
    from transformers import GPTNeoXForCausalLM

    from trainer.checkpoint import load_checkpoint

    run.ok("export-hf", straight, "--output", tmp_path / "hf")
    mask = os.umask(0)
    os.umask(mask)  # safetensors writes 0600; the export is read by others too (a shared cluster directory)
    assert stat.S_IMODE((tmp_path / "hf" / "model.safetensors").stat().st_mode) == 0o666 & ~mask
    ours, _ = load_checkpoint(straight)
    hf = GPTNeoXForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 50000, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.eval()(ids), rtol=1e-5, atol=1e-5)
    args = ("--prompt", "The", "--greedy", "--max-new-tokens", 12, "--json")
    generated = json.loads(run.ok("generate", straight, *args).output)
    prompt, ours_ids = generated["prompt_ids"], generated["generated_ids"]
    with torch.no_grad():  # our KV-cached greedy decoding is transformers' greedy decoding of the exported model
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=len(ours_ids), do_sample=False, pad_token_id=0)
    assert len(ours_ids) >= 1 and ours_ids == theirs[0, len(prompt) :].tolist()


def test_a_run_starts_from_the_weights_of_an_import_or_of_a_run_with_finetune(shards, straight, tmp_path, run):
    """--load of a checkpoint that is not a run (import-hf's output) starts at step 0 from its weights, as
    finetune: true does from a run: step 1's loss is the checkpoint's model's loss on step 1's batch. (Before, an
    import was taken for an empty --load: a warning, and training from random weights.) A requeued fine-tune
    resumes its own run; a --save holding another run is refused."""
    from trainer.checkpoint import load_checkpoint
    from trainer.model import lm_loss

    run.ok("export-hf", straight, "--output", tmp_path / "hf")
    run.ok("import-hf", tmp_path / "hf", "--output", tmp_path / "imported")
    shown = run.ok("batch", "--config", ROOT / "configs" / "tiny.yml", "--data", shards, "--step", 1, "--json", *SMALL)
    ids = torch.tensor(json.loads(shown.output)["tokens"])
    model, _ = load_checkpoint(straight)
    with torch.no_grad():
        expected = lm_loss(model(ids[:, :-1]), ids[:, 1:]).item()
    short = [*SMALL, "--set", "train_iters=2", "--set", "eval_interval=0"]
    a, b = tmp_path / "a", tmp_path / "b"
    imported = train("--data", shards, "--load", tmp_path / "imported", "--save", a, *short)
    assert f"starting at step 0 from the weights of {tmp_path / 'imported'}" in imported.stdout
    finetune = ["--set", "finetune=true"]
    train("--data", shards, "--load", straight, "--save", b, *short, *finetune)
    assert losses(a)[0] == (1, pytest.approx(expected, rel=1e-6)) and losses(b)[0] == losses(a)[0]
    requeued = train("--data", shards, "--load", straight, "--save", b, *short, *finetune, "--set", "train_iters=3")
    assert f"--save {b} holds this run at step 2 (started from {straight.resolve()}): resuming it" in requeued.stderr
    assert [s for s, _ in losses(b)] == [1, 2, 3]
    other = train("--data", shards, "--load", tmp_path / "imported", "--save", b, *short, *finetune, check=False)
    assert_clean_error(other.stderr, f"--save {b} holds a run at step 3 that did not start from the weights of")


def test_checkpoints_ship_the_tokenizer_the_config_names_and_a_stranger_to_the_shards_is_named(shards):
    from trainer.config import DataConfig
    from trainer.preflight import shipped_tokenizer

    built_with = json.loads((shards / "manifest.json").read_text())
    assert shipped_tokenizer(DataConfig(), built_with) == built_with["tokenizer"]["path"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same tokenizer, by its bundled name: nothing to say
        assert (
            Path(shipped_tokenizer(DataConfig(tokenizer="gpt-neox-20b"), built_with)).read_bytes() == NEOX.read_bytes()
        )
    with pytest.warns(UserWarning, match="tokenizer: gpt2 is not the tokenizer the shards were built with"):
        shipped_tokenizer(DataConfig(tokenizer="gpt2"), built_with)


def test_plan_sizes_the_checkpoints_train_writes(straight, run):
    """plan's checkpoint size is what train writes (DeepSpeed's files, the universal copy; the tokenizer is the
    rest), for the steps it saves."""
    planned = json.loads(run.ok("plan", "--config", ROOT / "configs" / "tiny.yml", *SMALL, "--json").output)
    written = sum(f.stat().st_size for f in (straight / "global_step6").rglob("*") if f.is_file())
    assert sum(planned["checkpoint_bytes"].values()) == pytest.approx(written, rel=0.03)
    assert (
        planned["checkpoints"] == 3 and len(list(straight.glob("global_step*"))) == planned["checkpoints_on_disk"] - 1
    )


def test_validation_loss_falls_and_is_reported_per_component(straight):
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in rows if r["kind"] == "valid"]
    assert [(r["step"], r["part"]) for r in valid] == [(0, 0), (3, 0), (6, 1), (6, 2)]  # gpt-neox's: the end's own
    assert valid[-1]["loss"] < valid[0]["loss"]
    assert len(valid[0]["components"]) >= 2 and all(v > 0 for v in valid[0]["components"].values())
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert all(r["grad_norm"] > 0 and r["lr"] > 0 and r["tokens_per_s"] > 0 for r in train_rows)
    assert train_rows[0]["lr"] < train_rows[1]["lr"]  # warmup, then decay
    assert [r for r in rows if r["kind"] == "test"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "optimizer={type: Lion, params: {lr: 0.001}}"], "optimizer.type: 'Lion'"),
        (["--set", "train_batch_size=12"], "train_batch_size 12 != train_micro_batch_size_per_gpu"),
        (["--set", "model_parallel_size=3"], "model_parallel_size 3 does not divide num_attention_heads"),
        (["--data", "/nonexistent/shards"], "--data: /nonexistent/shards is not a directory"),
        ([], "no training data"),
        (["--set", "lr_decay_style=exponential"], "lr_decay_style"),
        (["--set", "finetune=true"], "finetune: true needs --load"),
        (["--set", "tokenizer=/nonexistent/tokenizer.json"], "tokenizer: tokenizer not found: /nonexistent"),
        (
            ["--set", "tokenizer_type=HFTokenizer", "--set", "vocab_file=/etc/hostname"],
            "vocab_file: /etc/hostname: not a",
        ),
        (
            ["--set", "finetune=true", "--load", "/nonexistent/run"],
            "finetune: --load /nonexistent/run holds no checkpoint",
        ),
    ],
)
def test_bad_config_fails_before_any_work(tmp_path, args, message, shards):
    data = [] if "--data" in args or not args else ["--data", shards]
    result = train(*data, *args, "--save", tmp_path / "run", check=False)
    assert result.returncode == 1, result.stderr
    assert_clean_error(result.stderr, message)
    assert not (tmp_path / "run").exists()  # nothing was started


def test_fp16_on_cpu_and_a_load_without_checkpoint_say_so_and_train(shards, tmp_path):
    result = train(
        "--data",
        shards,
        "--save",
        tmp_path / "run",
        "--load",
        tmp_path / "run",
        *SMALL,
        "--set",
        "fp16=true",
        "--set",
        "train_iters=1",
        "--set",
        "extra_save_iters=[0]",  # Pythia's step 0 checkpoint: the weights before the first step
        "--set",
        "tokenizer=gpt-neox-20b",  # a bundled name (before, it shipped an empty tokenizer/)
    )
    assert "fp16 needs a GPU" in result.stderr and "training in fp32" in result.stderr
    assert "no checkpoint in" in result.stderr and "starting from step 0" in result.stderr
    assert losses(tmp_path / "run")[0][0] == 1
    assert sorted(p.name for p in (tmp_path / "run").glob("global_step*")) == ["global_step0", "global_step1"]
    Cli().ok("verify", tmp_path / "run")
    assert (tmp_path / "run" / "global_step0" / "tokenizer" / "tokenizer.json").read_bytes() == NEOX.read_bytes()


@pytest.mark.slow
def test_tp2_pp2_dp2_matches_one_process_and_exports(shards, straight, tmp_path):
    """8 processes, same global batch, same data, same init: the same losses; the checkpoint exports to HF."""
    from transformers import GPTNeoXForCausalLM

    from trainer.checkpoint import load_checkpoint

    run = tmp_path / "run"
    launch(8, "--data", shards, "--save", run, *SMALL, *layout(2, 2, 2))
    assert_same_losses(straight, run, 1e-4)
    assert (run / "latest").read_text() == "global_step6"
    Cli().ok("export-hf", run, "--output", tmp_path / "hf")  # layer files of 2 stages x 2 TP ranks, joined
    hf = GPTNeoXForCausalLM.from_pretrained(tmp_path / "hf").eval()
    reference, _ = load_checkpoint(straight)
    ids = torch.randint(0, 50000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # two runs equal to float reordering (losses to 1e-4): logits to 1e-4, not bit-exact
        torch.testing.assert_close(hf(ids).logits, reference.eval()(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,dp", [(2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 2, 2)], ids=lambda v: str(v))
def test_other_layouts_match_one_process(shards, straight, tmp_path, tp, pp, dp):
    """TP2, PP2, TP2 x PP2, PP2 x DP2 (DP2 alone: the test above; all three: the 8-process test)."""
    launch(
        tp * pp * dp,
        "--data",
        shards,
        "--save",
        tmp_path / "run",
        *SMALL,
        *layout(tp, pp, dp),
        "--set",
        "save_interval=0",
    )
    assert_same_losses(straight, tmp_path / "run", 1e-4)


RECORD_BATCHES = """
import json, os, sys
import trainer.train
real = trainer.train.Trainer.step_batches
seen = {}
def step_batches(self):
    batches = real(self)
    seen[self.step + 1] = [row for ids in batches for row in ids.tolist()]  # logged as step + 1
    with open(os.environ["BATCHES"], "w") as f:
        json.dump(seen, f)
    return batches
trainer.train.Trainer.step_batches = step_batches
import cli
cli.main(sys.argv[1:])
"""


def test_batch_shows_what_train_read_at_a_step(shards, tmp_path):
    """neox-data batch --step N equals the global batch train fed at step N (2 micro-batches a step here)."""
    accumulate = [*SMALL, "--set", "train_micro_batch_size_per_gpu=2", "--set", "gradient_accumulation_steps=2"]
    args = [
        *TINY,
        "--data",
        shards,
        "--save",
        tmp_path / "run",
        *accumulate,
    ]
    env = {**os.environ, "BATCHES": str(tmp_path / "seen.json")}
    done = subprocess.run(
        [sys.executable, "-c", RECORD_BATCHES, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads((tmp_path / "seen.json").read_text())
    for step in (1, 3, 6):
        shown = Cli().ok(
            "batch", "--config", ROOT / "configs" / "tiny.yml", "--data", shards, "--step", step, "--json", *accumulate
        )
        shown = json.loads(shown.output)
        assert {k: shown[k] for k in ("step", "tokens")} == {"step": step, "tokens": seen[str(step)]}
        assert shown["documents_masked"] is False and all(starts[0] == 0 for starts in shown["document_starts"])
    text = Cli().ok("batch", "--config", ROOT / "configs" / "tiny.yml", "--data", shards, "--step", 2, *accumulate)
    assert text.output.count("--- step 2 sample") == 4


def test_batch_builds_the_sample_index_of_train_alone(shards, tmp_path):
    """Showing a training step reads train's samples: valid's and test's indices are not built for it."""
    fresh = tmp_path / "shards"
    shutil.copytree(shards, fresh, ignore=shutil.ignore_patterns("index-cache"))
    Cli().ok("batch", "--config", ROOT / "configs" / "tiny.yml", "--data", fresh, "--step", 1, *SMALL, "--json")
    assert any((fresh / "train" / "index-cache").iterdir())
    assert not (fresh / "valid" / "index-cache").exists() and not (fresh / "test" / "index-cache").exists()


COUNT_READS = """
import json, os, sys, torch
import trainer.train
reads, flushes, real_flush = [], [], trainer.train.Trainer.flush
def flush(self):
    flushes.append(self.step)
    return real_flush(self)
def spy(real):
    def read(tensor, *args):  # a read of a tensor's value by the trainer: on a GPU, a wait for it
        caller = sys._getframe(1).f_code
        if caller.co_filename.endswith(os.path.join("trainer", "train.py")) and caller.co_name != "flush":
            reads.append(caller.co_name)
        return real(tensor, *args)
    return read
torch.Tensor.item, torch.Tensor.__float__ = spy(torch.Tensor.item), spy(torch.Tensor.__float__)
trainer.train.Trainer.flush = flush
import cli
try:
    cli.main(sys.argv[1:])
finally:
    with open(os.environ["READS"], "w") as f:
        json.dump({"reads": reads, "flushes": flushes}, f)
"""


def test_the_loss_and_norm_are_read_only_at_log_steps(shards, tmp_path):
    """Between log steps the trainer reads no tensor's value (each read waits for the GPU): the losses and norms
    of the steps since the last report are read together, at log_interval, a save or an evaluation."""
    args = [*TINY, "--data", shards, "--save", tmp_path / "run", *SMALL]
    args += [
        "--set",
        "log_interval=4",
        "--set",
        "train_iters=10",
        "--set",
        "save_interval=0",
        "--set",
        "eval_interval=0",
    ]
    env = {**os.environ, "READS": str(tmp_path / "reads.json")}
    done = subprocess.run(
        [sys.executable, "-c", COUNT_READS, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads((tmp_path / "reads.json").read_text())
    assert seen["flushes"] == [4, 8, 10]  # 10: the last step, saved
    assert set(seen["reads"]) == {"evaluate", "<dictcomp>"}  # only the evaluations after the last step read values
    assert [s for s, _ in losses(tmp_path / "run")] == list(range(1, 11))


def test_stop_signals_are_kept_from_the_start_and_given_back_their_handlers_at_the_end():
    """`train` records SIGTERM and SIGUSR1 from its first line (one that comes while torch loads is kept for the
    first step, not the end of the process), and a finished (or failed) run leaves them as it found them: a dead
    trainer's handler would swallow a later SIGTERM in the same process (a notebook, a sweep)."""
    import signal

    from trainer.stopping import StopRequests

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    stops = StopRequests()
    with stops.listening():
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
    assert stops.received == "SIGUSR1"  # the first one names the stop
    assert {s: signal.getsignal(s) for s in before} == before
    with pytest.raises(RuntimeError), StopRequests().listening():
        raise RuntimeError("a failed run")
    assert {s: signal.getsignal(s) for s in before} == before


LONG_LIVED = """
import gc, weakref
from pile_tools.ground import long_lived

class Node:
    pass

frozen = gc.get_freeze_count()
with long_lived():
    off = not gc.isenabled()
    kept = [Node() for _ in range(1000)]
    cycle = Node()
    cycle.me, gone = cycle, weakref.ref(cycle)
    del cycle
print(off, gc.isenabled(), gone() is None, gc.get_freeze_count() >= frozen + 1000)
gc.disable()
with long_lived():
    pass
print(gc.isenabled())
"""

GC_IN_RUN = """
import gc, sys
import trainer.train
real_run = trainer.train.Trainer.run
def run(self):
    collectable = {id(o) for o in gc.get_objects()}  # every generation but the frozen one
    print("in run:", gc.isenabled(), id(self.engine) in collectable, id(self.engine.module) in collectable)
    return real_run(self)
trainer.train.Trainer.run = run
import cli
cli.main(sys.argv[1:])
"""


def test_start_up_is_built_without_collections_then_frozen_with_its_garbage_freed(shards, tmp_path):
    """torch's and DeepSpeed's millions of objects are built with the cyclic collector off and then frozen out of
    later collections (each rescans every object); a cycle dropped meanwhile is still freed, and the collector is
    on again while the run trains, so the training loop's own garbage is collected."""
    done = subprocess.run([sys.executable, "-c", LONG_LIVED], cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.split() == ["True", "True", "True", "True", "False"], done.stdout + done.stderr
    args = [*TINY, "--data", shards, "--save", tmp_path / "run", *SMALL, "--set", "train_iters=1"]
    done = subprocess.run([sys.executable, "-c", GC_IN_RUN, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("in run:")[1].split()[:3] == ["True", "False", "False"], done.stdout  # engine frozen
