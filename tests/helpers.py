"""Helpers shared by the tests: corpus files in every input format, an independent reader, a CLI runner, and
`neox-data train` in a process of its own on a tiny, fast setting."""

import gzip
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import zstandard
from click.testing import CliRunner

import cli

ROOT = Path(__file__).parent.parent
SAMPLE = ROOT / "pile_tools" / "sample"
# Half tiny.yml's width for the training tests: the 50k vocabulary's embedding and output layer are most of the
# weights, and so of each checkpoint's bytes.
HALF_WIDTH = ["--set", "hidden_size=64"]
# A tiny model on short sequences: seconds per run, still every code path of the trainer.
SMALL = [
    *HALF_WIDTH,
    "--set",
    "seq_length=32",
    "--set",
    "train_micro_batch_size_per_gpu=4",
    "--set",
    "train_iters=6",
    "--set",
    "eval_interval=3",
    "--set",
    "eval_iters=2",
    "--set",
    "save_interval=2",
    "--set",
    "log_interval=1",
    "--set",
    "warmup=0.5",
]
NEOX = Path(__file__).parent.parent / "tokenizer" / "assets" / "gpt-neox-20b" / "tokenizer.json"


def read_jsonl_zst(path: Path) -> list[dict]:
    with open(path, "rb") as f:
        data = zstandard.ZstdDecompressor().stream_reader(f).read()
    return [orjson.loads(line) for line in data.splitlines() if line.strip()]


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    data = b"".join(orjson.dumps(d) + b"\n" for d in docs)
    if path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    elif path.name.endswith(".gz"):
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as g:
            g.write(data)
        data = buf.getvalue()
    path.write_bytes(data)
    return path


def sample_as_one_jsonl(directory: Path) -> Path:
    """The sample as one uncompressed .jsonl (build-shards --part-size 64K cuts it into about 45 parts)."""
    docs = [d for f in sorted(SAMPLE.glob("*.jsonl.zst")) for d in read_jsonl_zst(f)]
    return write_jsonl(directory / "sample.jsonl", docs)


def corpus_documents(root: Path) -> list[tuple[str, str]]:
    """(component, text) of every document of the `corpus` fixture, read independently of pile_tools."""
    docs = []
    for path in sorted(root.iterdir()):
        if path.name.endswith(".txt"):
            docs.append((path.name[:-4], path.read_text()))
            continue
        raw = path.read_bytes()
        if path.name.endswith(".zst"):
            raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
        elif path.name.endswith(".gz"):
            raw = gzip.decompress(raw)
        stem = path.name.split(".")[0]
        for line in raw.splitlines():
            d = json.loads(line)
            docs.append(((d.get("meta") or {}).get("pile_set_name", stem), d["text"]))
    return docs


class Cli:
    """Runs `neox-data` in-process; `ok` asserts success."""

    def __init__(self):
        self.runner = CliRunner()

    def __call__(self, *args):
        return self.runner.invoke(cli.main, [str(a) for a in args], catch_exceptions=False)

    def ok(self, *args):
        result = self(*args)
        assert result.exit_code == 0, result.output
        return result


def assert_clean_error(output: str, *phrases: str) -> None:
    """A negative test's output: the phrases, an error line, and never a Python traceback."""
    assert "Traceback" not in output and 'File "' not in output, output[-3000:]
    assert "Error" in output or "error" in output, output[-3000:]
    for phrase in phrases:
        assert phrase in output, (phrase, output[-3000:])


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every shard file's bytes and its source map's, by relative path: what must be identical between equivalent
    runs."""
    files = [p for p in sorted(root.rglob("*")) if p.suffix in (".bin", ".idx") or p.name.endswith(".lines.npy")]
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def neox(*args, env=None, check=True) -> subprocess.CompletedProcess:
    """`neox-data ARGS` in a process of its own, from the repository root; asserts success unless check=False."""
    cmd = [sys.executable, "-m", "cli", *map(str, args)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    assert not check or result.returncode == 0, result.stdout + result.stderr
    return result


TINY = ["train", "--config", ROOT / "configs" / "tiny.yml"]  # the CPU toy's train command, before its args


def train(*args, env=None, check=True) -> subprocess.CompletedProcess:
    """`neox-data train --config configs/tiny.yml ARGS` in a process of its own."""
    return neox(*TINY, *args, env=env, check=check)


def train_rows(run: Path) -> list[dict]:
    """The metrics.jsonl entries of a run's training steps."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def losses(run: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training step in a run's metrics.jsonl."""
    return [(r["step"], r["loss"]) for r in train_rows(run)]


def launch(processes: int, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`neox-data train --config configs/tiny.yml ARGS` on `processes` gloo ranks under the deepspeed launcher
    (`env`: more environment variables)."""
    from trainer.engine import free_port

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONFAULTHANDLER": "1", **(env or {})}
    for _ in range(3):  # the free port is closed before the launcher binds it: another process may take it first
        cmd = [bin_dir / "deepspeed", "--num_gpus", processes, "--master_port", free_port(), bin_dir / "neox-data"]
        result = subprocess.run(list(map(str, [*cmd, *TINY, *args])), cwd=ROOT, capture_output=True, text=True, env=env)
        if "address already in use" not in (result.stdout + result.stderr).lower():
            break
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def layout(tp: int, pp: int, dp: int) -> list[str]:
    """Overrides for TP x PP x DP with the straight run's global batch (4) and padded vocabulary (128 x TP 1)."""
    return [
        "--set",
        f"train_micro_batch_size_per_gpu={4 // dp}",
        "--set",
        f"model_parallel_size={tp}",
        "--set",
        f"pipe_parallel_size={pp}",
        "--set",
        f"make_vocab_size_divisible_by={128 // tp}",
    ]


def assert_same_losses(reference: Path, run: Path, rtol: float) -> None:
    """Every step's loss and gradient norm of `run` within `rtol` (relative) of `reference`'s."""
    one, other = train_rows(reference), train_rows(run)
    assert [r["step"] for r in one] == [r["step"] for r in other]
    for key in ("loss", "grad_norm"):
        a, b = [r[key] for r in one], [r[key] for r in other]
        assert None not in a + b and all(abs(x - y) <= rtol * abs(x) for x, y in zip(a, b)), (key, a, b)


def unconstant(model, seed: int):
    """Random values for every parameter initialised to a constant (LayerNorms' ones and zeros, zero biases): at
    their init, two such parameters are interchangeable (a block's two LayerNorms swapped compute the same), so a
    comparison there cannot tell them apart."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if bool((param == param.flatten()[0]).all()):
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


TIMINGS = ("created", "part_seconds", "wall_seconds", "timings")


def assert_same_build(ours: Path, local: Path) -> None:
    """Every .bin/.idx identical; blend.json and manifest.json too, less timings and the directories' names."""
    assert tree_bytes(ours) == tree_bytes(local) and len(tree_bytes(local)) >= 8
    assert (ours / "blend.json").read_text().replace(str(ours), "OUT") == (local / "blend.json").read_text().replace(
        str(local), "OUT"
    )
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (ours, local)]
    for m in manifests:
        for key in TIMINGS:
            m.pop(key)
    assert manifests[0] == manifests[1]


def parts_of(out: Path, rank: int, world: int, plan_parts: int) -> tuple[int, int]:
    """(committed parts of `rank`, parts it has) in `out`."""
    mine = [i for i in range(plan_parts) if i % world == rank]
    return sum((out / ".parts" / f"{i:05d}" / "receipt.json").is_file() for i in mine), len(mine)


def wait_for(condition, what: str, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return found


def planned_parts(out: Path) -> int:
    """How many parts the build's plan.json lists (0 before it is written)."""
    try:
        return len(json.loads((out / "plan.json").read_text())["parts"])
    except (OSError, ValueError):
        return 0


def lock_holder(out: Path, rank: int) -> int | None:
    """The pid holding a rank's lock: the process running that rank (a Ray worker, a Slurm array task)."""
    try:
        return json.loads((out / f".lock-rank{rank}").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None
