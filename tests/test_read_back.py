"""Nothing read back from disk is trusted: a checkpoint loads as data only, whatever its checksums say, and every
file the tools wrote and read again (blend.json, manifest.json, plan.json, index caches, locks, `latest`,
checksums.json, a part's index) is checked, rebuilt or refused in one line naming it."""

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import NEOX, ROOT, SMALL, TINY, Cli, assert_clean_error, train, write_jsonl

import pile_tools.runlock as runlock
from pile_tools.checksums import hash_files, listed_files, read_checksums, write_checksums
from pile_tools.runlock import RunLock
from trainer.stopping import STOPPED


class Payload:
    """What a crafted checkpoint holds: unpickling it runs `touch MARKER` (were it loaded as a pickle)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def craft(checkpoint: Path, name: str, marker: Path, wrap=lambda payload: {"module": payload}) -> None:
    """Replace `name` in a checkpoint with a pickle that would run code, and rewrite checksums.json to vouch for it,
    as whoever crafted it would."""
    torch.save(wrap(Payload(marker)), checkpoint / name)
    vouch(checkpoint)


def vouch(checkpoint: Path) -> None:
    """checksums.json rewritten for the checkpoint's files as they are now."""
    recorded = read_checksums(checkpoint)
    extra = {k: v for k, v in recorded.items() if k not in ("algorithm", "files")}
    write_checksums(checkpoint, hash_files(checkpoint, listed_files(checkpoint)), **extra)


def refused(result, path: Path, marker: Path) -> None:
    """Exit 1, one line naming the crafted file, and nothing ran."""
    output = result.output if hasattr(result, "output") else result.stdout + result.stderr
    assert getattr(result, "exit_code", getattr(result, "returncode", None)) == 1, output[-3000:]
    assert_clean_error(output, str(path), "refused to load", "could run code")
    assert not marker.exists(), "the crafted checkpoint ran its code"


@pytest.fixture
def crafted_run(straight, tmp_path) -> tuple[Path, Path]:
    """A copy of the straight run, and the marker a payload would create."""
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    return run, tmp_path / "PWNED"


@pytest.mark.parametrize("command", ["export-hf", "generate", "evaluate"])
def test_a_crafted_checkpoint_runs_no_code_in_the_commands_that_read_one(crafted_run, tmp_path, command):
    run, marker = crafted_run
    craft(run / "global_step6", "mp_rank_00_model_states.pt", marker)
    args = {
        "export-hf": ["export-hf", run, "--output", tmp_path / "hf"],
        "generate": ["generate", run, "--prompt-ids", "1,2", "--max-new-tokens", "2"],
        "evaluate": ["evaluate", run, "--limit", "2"],
    }[command]
    refused(Cli()(*args), run / "global_step6" / "mp_rank_00_model_states.pt", marker)


def test_crafted_pytorch_weights_run_no_code_in_import_hf(straight, tmp_path):
    hf, marker = tmp_path / "hf", tmp_path / "PWNED"
    Cli().ok("export-hf", straight, "--output", hf)
    (hf / "model.safetensors").unlink()
    torch.save({"gpt_neox.embed_in.weight": Payload(marker)}, hf / "pytorch_model.bin")
    refused(Cli()("import-hf", hf, "--output", tmp_path / "imported"), hf / "pytorch_model.bin", marker)


@pytest.mark.parametrize(
    "name,wrap",
    [
        ("mp_rank_00_model_states.pt", lambda p: {"module": p}),  # DeepSpeed's own load of its files
        ("rng_state_0.pt", lambda p: p),  # ours, after DeepSpeed's
    ],
)
def test_a_crafted_checkpoint_runs_no_code_when_a_run_resumes_from_it(shards, crafted_run, name, wrap):
    run, marker = crafted_run
    craft(run / "global_step6", name, marker, wrap)
    result = train("--data", shards, "--save", run, "--load", run, *SMALL, "--set", "train_iters=8", check=False)
    refused(result, run / "global_step6" / name, marker)


def test_a_crafted_checkpoint_runs_no_code_when_a_run_starts_from_its_weights(shards, crafted_run, tmp_path):
    run, marker = crafted_run
    craft(run / "global_step6", "mp_rank_00_model_states.pt", marker)
    args = ["--data", shards, "--save", tmp_path / "tuned", "--load", run, *SMALL, "--set", "finetune=true"]
    refused(train(*args, check=False), run / "global_step6" / "mp_rank_00_model_states.pt", marker)


def test_a_crafted_universal_copy_runs_no_code_when_another_layout_resumes(shards, crafted_run):
    """A resume in another layout reads the universal copy through torch.distributed.checkpoint, whose metadata is
    a plain pickle. A second rank's RNG file makes the checkpoint look saved with DP 2, so one process reshards."""
    run, marker = crafted_run
    where = run / "global_step6"
    shutil.copy(where / "rng_state_0.pt", where / "rng_state_1.pt")
    metadata = where / "universal" / "embed_out" / ".metadata"
    metadata.write_bytes(pickle.dumps(Payload(marker)))
    vouch(where)
    result = train("--data", shards, "--save", run, "--load", run, *SMALL, "--set", "train_iters=8", check=False)
    refused(result, metadata, marker)
    assert "it needs posix.system" in result.stderr


def test_no_load_of_ours_can_run_code():
    """The project itself holds no torch.load that allows pickles: a grep for weights_only set false finds none."""
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("pile_tools", "tokenizer", "trainer", "tests", "benchmarks", "notebooks")
        for path in (ROOT / folder).rglob("*.*")
        if path.suffix in (".py", ".ipynb") and "weights_only=" + "False" in path.read_text()
    ]
    assert offenders == []


# blend.json, manifest.json: edited by hand or cut short


def copy_shards(shards: Path, dest: Path) -> Path:
    return Path(shutil.copytree(shards, dest, ignore=shutil.ignore_patterns("index-cache")))


def edit_blend(data: Path, edit) -> Path:
    path = data / "blend.json"
    blend = json.loads(path.read_text())
    edit(blend)
    path.write_text(json.dumps(blend))
    return path


def batch_of(data: Path, step: int = 1, *extra):
    """`neox-data batch` of the tiny config's run on `data`, in this process."""
    return Cli()("batch", "--config", ROOT / "configs" / "tiny.yml", "--data", data, "--step", step, *SMALL, *extra)


def failed(result, *phrases) -> None:
    """An in-process command that exited 1 with one clean error line holding the phrases."""
    assert result.exit_code == 1, result.output
    assert_clean_error(result.output, *phrases)


@pytest.mark.parametrize(
    "edit,message",
    [
        (None, "blend.json: not valid JSON"),
        (lambda b: b["splits"]["train"]["shards"][0].pop("weight"), "splits.train.shards.0.weight: missing"),
        (
            lambda b: b["splits"]["train"]["shards"][0].update(prefix="/etc/passwd"),
            "'/etc/passwd' is not a path inside its directory",
        ),
        (
            lambda b: b["splits"]["train"]["shards"][0].update(prefix="../../elsewhere/train/x"),
            "is not a path inside its directory",
        ),
        (lambda b: b["splits"]["train"]["shards"][1].update(weight=-0.5), "greater than or equal to 0, found -0.5"),
    ],
)
def test_a_blend_edited_wrongly_is_one_line_in_verify_batch_and_train(shards, tmp_path, edit, message):
    data = copy_shards(shards, tmp_path / "shards")
    if edit is None:
        (data / "blend.json").write_text((data / "blend.json").read_text()[:-40])
    else:
        edit_blend(data, edit)
    failed(Cli()("verify", data), str(data / "blend.json"), message)
    failed(batch_of(data), str(data / "blend.json"), message)
    if edit is None or "inside" in message:  # train reads it through the same reader: two cases suffice
        result = train("--data", data, *SMALL, check=False)
        assert result.returncode == 1
        assert_clean_error(result.stderr, str(data / "blend.json"), message)
    assert not (tmp_path / "elsewhere").exists() and not Path("/etc/index-cache").exists()


def test_verify_refuses_nan_weights(shards, tmp_path):
    data = copy_shards(shards, tmp_path / "shards")
    edit_blend(data, lambda b: b["splits"]["train"]["shards"][0].update(weight=float("nan")))  # json writes NaN
    failed(Cli()("verify", data), "NaN is not a JSON number")


def test_a_cut_short_manifest_fails_verify_and_inspect_in_one_line(shards, tmp_path):
    data = copy_shards(shards, tmp_path / "shards")
    manifest = data / "manifest.json"
    manifest.write_text(manifest.read_text()[: len(manifest.read_text()) // 2])
    failed(Cli()("verify", data), f"{manifest}: not valid JSON")
    failed(Cli()("inspect", data), f"{manifest}: not valid JSON")


# The sample index cache


@pytest.mark.parametrize("damage", ["truncate", "random", "zeroed"])
def test_a_damaged_index_cache_is_rebuilt_with_a_warning(shards, tmp_path, damage):
    data = copy_shards(shards, tmp_path / "shards")
    clean = json.loads(batch_of(data, 2, "--json").output.splitlines()[-1])
    target = sorted((data / "train" / "index-cache").glob("*_shuffle_idx.npy"))[0]
    raw = target.read_bytes()
    header = 128  # numpy's .npy header: the data follows it
    target.write_bytes(
        {
            "truncate": raw[: len(raw) // 2],
            "random": np.random.default_rng(0).bytes(len(raw)),
            "zeroed": raw[:header] + bytes(len(raw) - header),
        }[damage]
    )
    again = batch_of(data, 2, "--json")
    assert "the sample index cache is damaged, so it is built again" in again.output and str(target) in again.output
    assert json.loads(again.output.splitlines()[-1]) == clean
    assert "damaged" not in batch_of(data, 2, "--json").output


# Locks


def build_into(corpus: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    """build-shards of the corpus into `out`, in a process of its own that may not spin for more than 60 s."""
    args = ["build-shards", corpus, "--tokenizer", NEOX, "--output", out, "--split", "1,0,0", "--workers", 1, *extra]
    cmd = [sys.executable, "-m", "cli", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("content", ["null", "[]", '{"host": "h", "pid": "12"}'])
def test_a_malformed_lock_is_one_line_with_the_fix_and_no_spin(corpus, tmp_path, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text(content)
    result = build_into(corpus, out)
    assert result.returncode == 1
    assert_clean_error(result.stderr, f"{out / '.lock'}: ", f"remove {out / '.lock'} once no run uses")


def test_a_live_lock_of_another_pid_namespace_is_not_taken_over(corpus, tmp_path):
    """A run in a container that shares this host's name but not its pids: its pid cannot be looked up from here,
    so its fresh lock is refused (before, it was taken over as "ended", and two runs wrote one directory); once
    its heartbeat is stale, it is taken over."""
    out = tmp_path / "out"
    out.mkdir()
    holder = {"host": socket.gethostname(), "pid": 999999999, "started": time.time(), "create_time": 0}
    (out / ".lock").write_text(json.dumps({**holder, "pid_ns": "pid:[1]"}))
    result = build_into(corpus, out)
    assert result.returncode == 1
    assert_clean_error(result.stderr, "pid 999999999", "in another PID namespace of this host), alive")
    stale = time.time() - runlock.STALE_S - 30
    os.utime(out / ".lock", (stale, stale))
    with pytest.warns(UserWarning, match="taking over the lock of a run that left it untouched"):
        with RunLock(out):
            pass


HOLD = """
import sys, time
import pile_tools.build
real = pile_tools.build.run_build
def held(*args, **kwargs):  # once the output's lock is taken: stay until killed
    print("holding", flush=True)
    time.sleep(600)
pile_tools.build.run_build = held
import cli
cli.main(sys.argv[1:])
"""


@pytest.mark.parametrize(
    "first,second", [([], ["--rank", "0", "--world-size", "2"]), (["--rank", "0", "--world-size", "2"], [])]
)
def test_a_whole_build_and_a_rank_of_one_never_share_an_output(corpus, tmp_path, first, second):
    out = tmp_path / "out"
    args = ["build-shards", corpus, "--tokenizer", NEOX, "--output", out, "--split", "1,0,0", "--workers", 1]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, *map(str, args + first)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        result = Cli()(*args, *second)
        assert result.exit_code == 1
        assert_clean_error(result.output, "is in use by another run", f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()


# latest


@pytest.mark.parametrize("content", ["\x00\x01garbage", "../other/global_step30", "/tmp/global_step30"])
def test_latest_is_never_followed_out_of_its_run(crafted_run, tmp_path, content):
    run, _ = crafted_run
    (tmp_path / "other" / "global_step30").mkdir(parents=True)
    (run / "latest").write_text(content)
    result = Cli()("export-hf", run, "--output", tmp_path / "hf")
    assert result.exit_code == 1
    assert_clean_error(result.output, f"{run / 'latest'}: holds", "not a checkpoint tag of this run")
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    failed(Cli()("verify", run), "not a checkpoint tag")


def test_a_resume_with_garbage_in_latest_takes_the_newest_checkpoint_that_verifies(shards, crafted_run):
    run, _ = crafted_run
    (run / "latest").write_text("garbage")
    result = train("--data", shards, "--save", run, "--load", run, *SMALL, "--set", "train_iters=7")
    assert "not a checkpoint tag of this run" in result.stderr and "trying the newest checkpoint" in result.stderr
    assert (run / "latest").read_text() == "global_step7"


@pytest.mark.parametrize(
    "text,message",
    [("{{{", "config.yml: not valid YAML at line 1"), ("num_layers: 3\n", "its weights are not the model its config")],
)
def test_a_checkpoint_config_that_does_not_fit_its_weights_is_one_line(crafted_run, tmp_path, text, message):
    run, _ = crafted_run
    (run / "global_step6" / "config.yml").write_text(text)
    vouch(run / "global_step6")  # edited by hand, checksums and all
    result = Cli()("export-hf", run, "--output", tmp_path / "hf")
    assert result.exit_code == 1
    assert_clean_error(result.output, message)


def test_checksums_naming_a_file_outside_their_checkpoint_do_not_verify(crafted_run):
    run, _ = crafted_run
    path = run / "global_step6" / "checksums.json"
    recorded = json.loads(path.read_text())
    recorded["files"]["../../outside"] = {"size": 1, "xxh3_128": "0"}
    path.write_text(json.dumps(recorded))
    failed(Cli()("verify", run / "global_step6"), "'../../outside' is not a path inside its directory")


# merge-shards


def rank_runs(corpus: Path, out: Path, *extra) -> list[str]:
    args = ["build-shards", corpus, "--tokenizer", NEOX, "--output", out, "--split", "1,0,0", "--workers", 1]
    return [*map(str, args), "--world-size", "2", *extra]


def test_merge_names_a_cut_short_part_and_rerunning_its_rank_makes_it_again(corpus, tmp_path):
    out = tmp_path / "out"
    for rank in (0, 1):
        Cli().ok(*rank_runs(corpus, out, "--rank", rank))
    index = sorted((out / ".parts" / "00001").rglob("*.idx"))[0]
    index.write_bytes(index.read_bytes()[:20])
    merged = Cli()("merge-shards", out, "--output", out)
    assert merged.exit_code == 1
    assert_clean_error(merged.output, str(index).removesuffix(".idx"), "shorter than an index's header")
    again = Cli().ok(*rank_runs(corpus, out, "--rank", 1))
    assert "1 committed part(s) of this rank are not whole, and are encoded again" in again.output
    Cli().ok("merge-shards", out, "--output", out)
    assert (out / "manifest.json").is_file()


def test_merge_names_a_damaged_plan_and_the_rank_to_run(corpus, tmp_path):
    out = tmp_path / "out"
    Cli().ok(*rank_runs(corpus, out, "--rank", 0))
    missing = Cli()("merge-shards", out, "--output", out)
    assert missing.exit_code == 1
    assert_clean_error(missing.output, "run build-shards again for --rank 1 --world-size 2", "then merge-shards")
    (out / "plan.json").write_text((out / "plan.json").read_text()[:-10])
    damaged = Cli()("merge-shards", out, "--output", out)
    assert damaged.exit_code == 1
    assert_clean_error(damaged.output, f"{out / 'plan.json'}: not valid JSON")


# The smaller findings


@pytest.mark.parametrize(
    "change,message",
    [
        ("rotary_pct=0.5", "rotary_pct 0.25 (this run: 0.5)"),
        ("gpt_j_residual=false", "gpt_j_residual True (this run: False)"),
        ("vocab_size=60000", "set vocab_size 50277 (the checkpoint's tokenizer)"),
    ],
)
def test_a_resume_with_another_architecture_is_refused_naming_the_keys(shards, straight, tmp_path, change, message):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    result = train("--data", shards, "--save", run, "--load", run, *SMALL, "--set", change, check=False)
    assert result.returncode == 1
    assert_clean_error(result.stderr, f"--load {run / 'global_step6'}: the checkpoint's model has", message)


def test_generate_refuses_an_id_outside_the_vocabulary(straight):
    result = Cli()("generate", straight, "--prompt-ids", "999999")
    assert result.exit_code == 1
    assert_clean_error(result.output, "--prompt-ids: 999999 is not a token id", "0 to 50,276")


def docs_of(out: Path) -> int:
    return json.loads((out / "manifest.json").read_text())["components"]["Github"]["splits"]["train"]["documents"]


GOOD = {"text": "a good document", "meta": {"pile_set_name": "Github"}}


def test_inputs_symlinked_given_twice_or_with_a_bom_are_read_once_each(tmp_path, run):
    real, inputs = tmp_path / "real", tmp_path / "inputs"
    real.mkdir()
    inputs.mkdir()
    write_jsonl(real / "a.jsonl", [GOOD] * 3)
    (inputs / "linked").symlink_to(real)
    (inputs / "loop").symlink_to(inputs)  # a link back up: followed once
    bom = inputs / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n" + json.dumps(GOOD).encode() + b"\n")
    out = tmp_path / "out"
    result = run("build-shards", inputs, bom, "--tokenizer", NEOX, "--output", out, "--split", "1,0,0", "--workers", 1)
    assert result.exit_code == 0, result.output
    assert "given twice: read once" in result.output and "skipped" not in result.output
    assert docs_of(out) == 3 + 2


@pytest.mark.slow
def test_a_preemption_on_an_evaluation_step_keeps_its_evaluation(shards, tmp_path):
    run = tmp_path / "run"
    steps = [*SMALL, "--set", "train_iters=400", "--set", "save_interval=1000", "--set", "eval_interval=1"]
    args = [sys.executable, "-m", "cli", *map(str, [*TINY, "--data", shards, "--save", run, *steps])]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").is_file() or len((run / "metrics.jsonl").read_text().splitlines()) < 4:
        assert proc.poll() is None and time.time() < deadline, "the run ended before the signal"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = max(r["step"] for r in rows if r["kind"] == "train")
    assert proc.returncode == STOPPED and f"after step {last}" in err
    assert last in {r["step"] for r in rows if r["kind"] == "valid"}, rows[-3:]
