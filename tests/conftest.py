"""Fixtures: a multi-component corpus cut from the bundled sample, in every input format, a CLI runner, and the
long work started with the session that tests wait for at the end (the demo, the Slurm runs)."""

import shutil
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


# The order pytest-xdist hands the test files out in (`--no-loadscope-reorder`, a file to a worker at a time): the
# longest first, so that the two workers end together; last, those that read the session's background work, ready
# after ~5 min (the Slurm runs) and ~7 min (the demo), so that a worker reaching them early waits the least. A file
# not named goes between, in name order.
FIRST = ["test_faults.py", "test_train.py", "test_read_back.py", "test_evaluate.py", "test_layouts.py",
         "test_sources.py", "test_build_shards.py", "test_ray.py", "test_cli.py", "test_bad_input.py"]  # fmt: skip
LAST = ["test_slurm.py", "test_documents.py", "test_notebooks.py", "test_readme.py"]


def file_rank(item) -> tuple[int, int, str]:
    name = item.path.name
    if name in FIRST:
        return (0, FIRST.index(name), name)
    return (2, LAST.index(name), name) if name in LAST else (1, 0, name)


def pytest_collection_modifyitems(items):
    """Test files in FIRST-to-LAST order (each file's tests in theirs). Tests that read the session's background
    work may wait for it longer than pytest-timeout's 300 s."""
    items.sort(key=file_rank)
    for item in items:
        if "demo" in item.fixturenames or item.path.name == "test_slurm.py":
            item.add_marker(pytest.mark.timeout(1500))


@pytest.fixture(scope="session", autouse=True)
def background(request, tmp_path_factory) -> Path:
    """The long work only some tests wait for, started with the session so that it runs beside the others: the
    README's demo and the runs tests/test_slurm.py checks, each only when a selected test needs it, by one process of
    the session (tests/background.py); the directory their results are written to."""
    from background import Background, shared_root, starts_here

    directory = shared_root(tmp_path_factory) / "background"
    if not starts_here():
        yield directory
        return
    directory.mkdir(exist_ok=True)
    items, work, slurm = request.session.items, Background(directory), None
    if any("demo" in item.fixturenames for item in items):
        from demo import run_demo

        (directory / "demo").mkdir(exist_ok=True)
        work.start("demo", run_demo, directory / "demo")
    if any(item.path.name == "test_slurm.py" for item in items):
        slurm = start_slurm_runs(work, request.getfixturevalue("shards"), directory)
    yield directory
    work.finish()
    if slurm is not None:
        slurm.stop()


def start_slurm_runs(work, shards: Path, directory: Path):
    """A one-node Slurm and the runs on it (tests/slurm_runs.py), each a piece of background work; the cluster, or
    None where it cannot start here (written as the piece "slurm-skip")."""
    from slurm import Slurm
    from slurm_runs import Runs

    (directory / "slurm").mkdir(exist_ok=True)
    slurm, why = Slurm.start(directory / "slurm")
    if slurm is None:
        work.start("slurm-skip", lambda: f"no one-node Slurm here: {why}")
        return None
    work.start("slurm-skip", lambda: None)
    runs = Runs(slurm, shards, directory / "slurm-runs")
    runs.work.mkdir(exist_ok=True)
    many_parts = sample_as_one_jsonl(runs.work)
    work.start("slurm-time-limit", runs.time_limit)  # the longest: ~4 min of Slurm's pace, little CPU
    work.start("slurm-reference", runs.reference)
    work.start("slurm-stops", runs.stops)
    work.start("slurm-two-nodes", runs.two_nodes)
    work.start("slurm-shards", runs.shards_array, many_parts)
    return slurm


@pytest.fixture(scope="session")
def demo(background):
    """The README's demo, run once: (its work directory, holding demo-output/, and each command's output).
    The notebooks read it as `make demo`'s output, so the suite trains the demo's model once."""
    from background import result

    return background / "demo", result(background, "demo")


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
