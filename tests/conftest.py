"""Fixtures: a multi-component corpus cut from the bundled sample, in every input format, a CLI runner, and the
long work started with the session that tests wait for at the end (the demo, the Slurm runs)."""

import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import SAMPLE, SMALL, Cli, read_jsonl_zst, sample_as_one_jsonl, train, write_jsonl


@pytest.fixture(scope="session")
def sample_docs() -> dict[str, list[dict]]:
    """The bundled sample's documents, by file."""
    return {p.name: read_jsonl_zst(p) for p in sorted(SAMPLE.glob("*.jsonl.zst"))}


@pytest.fixture
def corpus(tmp_path, sample_docs) -> Path:
    """Real text in every input format: zst per component, a mixed plain .jsonl, a .jsonl.gz and a .txt."""
    root = tmp_path / "corpus"
    root.mkdir()
    for name in ("DM_Mathematics.jsonl.zst", "Enron_Emails.jsonl.zst"):
        shutil.copy(SAMPLE / name, root / name)
    mixed = [d for name in ("Fortunes.jsonl.zst", "PythonDocs.jsonl.zst") for d in sample_docs[name][:25]]
    mixed = [mixed[i // 2] if i % 2 == 0 else mixed[25 + i // 2] for i in range(50)]  # interleave two components
    write_jsonl(root / "mixed.jsonl", mixed)
    write_jsonl(root / "github.jsonl.gz", [{"text": d["text"]} for d in sample_docs["Github.jsonl.zst"][:15]])
    (root / "bible.txt").write_text(sample_docs["Gutenberg_PG_19.jsonl.zst"][0]["text"])
    return root


@pytest.fixture
def run():
    return Cli()


@dataclass
class Background:
    """Work started with the session: the demo's (work directory, future) and the Slurm runs' futures by name, or
    why the Slurm runs could not start."""

    demo: tuple[Path, Future] | None = None
    slurm_runs: dict[str, Future] = field(default_factory=dict)
    slurm_skip: str | None = None


@pytest.fixture(scope="session", autouse=True)
def background(request, tmp_path_factory):
    """The long work only some tests wait for, started with the session so that it runs beside the others (most of
    them keep one of this machine's two cores busy, and the Slurm runs mostly wait on Slurm): the README's demo and
    the runs tests/test_slurm.py checks, each only when a selected test needs it."""
    items = request.session.items
    started, pool = Background(), ThreadPoolExecutor(max_workers=12, thread_name_prefix="background")
    slurm = None
    if any("demo" in item.fixturenames for item in items):
        from demo import run_demo

        work = tmp_path_factory.mktemp("demo")
        started.demo = (work, pool.submit(run_demo, work))
    if any(item.path.name == "test_slurm.py" for item in items):
        slurm = start_slurm_runs(started, pool, request.getfixturevalue("shards"), tmp_path_factory)
    yield started
    if slurm is not None:
        slurm.stop()
    pool.shutdown(wait=False, cancel_futures=True)


def start_slurm_runs(started: Background, pool: ThreadPoolExecutor, shards: Path, tmp_path_factory):
    """A one-node Slurm and the runs on it, each in a thread; the cluster, or None where it cannot start here."""
    from slurm import Slurm
    from slurm_runs import Runs

    slurm, why = Slurm.start(tmp_path_factory.mktemp("slurm"))
    if slurm is None:
        started.slurm_skip = f"no one-node Slurm here: {why}"
        return None
    runs = Runs(slurm, shards, tmp_path_factory.mktemp("slurm-runs"))
    many_parts = sample_as_one_jsonl(tmp_path_factory.mktemp("slurm-input"))
    started.slurm_runs = {
        "time-limit": pool.submit(runs.time_limit),  # the longest first
        "reference": pool.submit(runs.reference),
        "usr1": pool.submit(runs.stopped, ("--signal=USR1",), 3),
        "term": pool.submit(runs.stopped, (), 3),
        "kill": pool.submit(runs.stopped, ("SIGKILL",), 12),
        "lost-rank": pool.submit(runs.lost_rank),
        "two-nodes": pool.submit(runs.two_nodes),
        "shards": pool.submit(runs.shards_array, many_parts),
    }
    return slurm


@pytest.fixture(scope="session")
def demo(background):
    """The README's demo, run once: (its work directory, holding demo-output/, and each command's output).
    The notebooks read it as `make demo`'s output, so the suite trains the demo's model once."""
    work, future = background.demo
    return work, future.result()


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """The bundled sample as shards (80/10/10), for the trainer's tests."""
    out = tmp_path_factory.mktemp("shards") / "shards"
    Cli().ok(
        "build-shards", SAMPLE, "--tokenizer", "gpt-neox-20b", "--output", out, "--split", "80,10,10", "--workers", 1
    )
    return out


@pytest.fixture(scope="session")
def straight(shards, tmp_path_factory) -> Path:
    """6 steps in one go, saved every 2: the reference run (read-only: copy it to change it)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train("--data", shards, "--save", run, *SMALL)
    return run
