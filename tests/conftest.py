"""Fixtures: a multi-component corpus cut from the bundled sample, in every input format, and a CLI runner."""

import shutil
from pathlib import Path

import pytest
from helpers import SAMPLE, SMALL, Cli, read_jsonl_zst, train, write_jsonl


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


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The README's demo, run once: (its work directory, holding demo-output/, and each command's output).
    The notebooks read it as `make demo`'s output, so the suite trains the demo's model once."""
    from demo import run_demo

    work = tmp_path_factory.mktemp("demo")
    return work, run_demo(work)


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
