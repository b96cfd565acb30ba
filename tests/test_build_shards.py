"""build-shards end to end on real text: round trip, splits, weights, determinism, resume, ranks."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil
import pytest
from helpers import NEOX, ROOT, assert_clean_error, corpus_documents, tree_bytes, write_jsonl
from test_indexed import read_by_spec
from tokenizers import Tokenizer

from pile_tools.components import slugify


def shard_docs(out: Path) -> dict[str, list[list[int]]]:
    """Every shard's documents, read with the spec reader."""
    return {str(p.relative_to(out))[:-4]: read_by_spec(p.with_suffix(""))[7] for p in sorted(out.rglob("*.idx"))}


def test_round_trip_equals_tokenizers_plus_eod(corpus, tmp_path, run):
    out = tmp_path / "out"
    run.ok("build-shards", corpus, "--tokenizer", NEOX, "--output", out, "--split", "80,15,5", "--workers", 2)
    tok = Tokenizer.from_file(str(NEOX))
    expected = defaultdict(list)  # every document, in input order, under each split's shard of its component
    got = shard_docs(out)
    where = {tuple(ids): name for name, docs in got.items() for ids in docs}
    for component, text in corpus_documents(corpus):
        ids = tok.encode(text, add_special_tokens=False).ids + [0]
        name = where.get(tuple(ids))
        assert name is not None and name.endswith("/" + slugify(component)), (component, text[:80])
        expected[name].append(ids)
    assert got == dict(expected)
    assert {name.split("/")[0] for name in got} == {"train", "valid", "test"}
    assert {name.split("/")[1] for name in got} == {
        "dm-mathematics",
        "enron-emails",
        "fortunes",
        "pythondocs",
        "github",
        "bible",
    }


def test_split_is_a_stable_hash_of_the_text(corpus, tmp_path, run):
    """A document's split does not depend on what else is in the run, and duplicates never straddle splits."""
    docs = [{"text": f"document number {i}\n" * (i % 7 + 1)} for i in range(400)]
    write_jsonl(tmp_path / "a.jsonl", docs + docs[:50])  # exact duplicates
    write_jsonl(tmp_path / "b.jsonl", docs[::-1][:200])  # half of them, reversed, in another run
    run.ok("build-shards", tmp_path / "a.jsonl", "--tokenizer", NEOX, "--output", tmp_path / "A", "--split", "6,3,1")
    run.ok("build-shards", tmp_path / "b.jsonl", "--tokenizer", NEOX, "--output", tmp_path / "B", "--split", "6,3,1")
    tok = Tokenizer.from_file(str(NEOX))

    def split_of_each(out, component):
        return {
            tuple(ids): s for s in ("train", "valid", "test") for ids in shard_docs(out).get(f"{s}/{component}", [])
        }

    a, b = split_of_each(tmp_path / "A", "a"), split_of_each(tmp_path / "B", "b")
    key = {d["text"]: tuple(tok.encode(d["text"]).ids + [0]) for d in docs}
    assert all(a[key[d["text"]]] == b[key[d["text"]]] for d in docs[::-1][:200])
    shards = shard_docs(tmp_path / "A")
    for split in ("train", "valid", "test"):  # duplicates land together, input order kept
        assert shards[f"{split}/a"] == [list(key[d["text"]]) for d in docs + docs[:50] if a[key[d["text"]]] == split]
    assert 0.5 < len(shards["train/a"]) / 450 < 0.7 and len(shards["test/a"]) < len(shards["valid/a"])


def test_blend_and_manifest(corpus, tmp_path, run):
    out = tmp_path / "out"
    run.ok("build-shards", corpus, "--tokenizer", "gpt-neox-20b", "--output", out, "--split", "995,4,1")
    blend = json.loads((out / "blend.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    train = blend["splits"]["train"]["shards"]
    epochs = {r["component"]: r["epochs"] for r in train}
    assert epochs["DM Mathematics"] == 2.0 and epochs["Enron Emails"] == 2.0 and epochs["Fortunes"] == 1.0
    mass = {r["prefix"]: r["epochs"] * r["tokens"] for r in train}
    for r in train:
        assert r["weight"] == pytest.approx(mass[r["prefix"]] / sum(mass.values()))
    assert blend["gpt_neox"]["train_data_weights"] == [r["weight"] for r in train]
    assert blend["gpt_neox"]["train_data_paths"] == [str((out / r["prefix"]).resolve()) for r in train]
    pairs = blend["splits"]["train"]["data_path"].split()
    assert pairs[1::2] == blend["gpt_neox"]["train_data_paths"] and len(pairs) == 2 * len(train)
    assert manifest["tokenizer"]["sha256"] == "56ac4821e129d2c520fdaba60abd920fa852ada51b45c0dd52bbb6bd8c985ade"
    assert manifest["tokenizer"]["dtype"] == "uint16" and manifest["tokenizer"]["eod"] == 0
    assert {i["path"] for i in manifest["inputs"]} == {str(p.resolve()) for p in corpus.iterdir()}
    total_docs = sum(s["documents"] for c in manifest["components"].values() for s in c["splits"].values())
    assert total_docs == len(corpus_documents(corpus))
    assert "Fortunes" in manifest["unknown_components"] and manifest["skipped"] == {}
    weights = {r["prefix"]: r["weight"] for r in train}
    assert manifest["components"]["DM Mathematics"]["splits"]["train"]["weight"] == weights["train/dm-mathematics"]


def test_weights_file_none_and_materialize(corpus, tmp_path, run):
    weights = tmp_path / "w.json"
    weights.write_text(json.dumps({"DM Mathematics": 2.5, "Enron Emails": 0, "Fortunes": 1}))
    out = tmp_path / "out"
    run.ok(
        "build-shards",
        corpus,
        "--tokenizer",
        NEOX,
        "--output",
        out,
        "--weights",
        weights,
        "--materialize",
        "--split",
        "1,0,0",
    )
    blend = json.loads((out / "blend.json").read_text())
    rows = {r["component"]: r for r in blend["splits"]["train"]["shards"]}
    assert rows["Enron Emails"]["weight"] == 0 and rows["DM Mathematics"]["epochs"] == 2.5
    docs = shard_docs(out)
    mat = shard_docs(out)["materialized/train"]
    math, fortunes = docs["train/dm-mathematics"], docs["train/fortunes"]
    assert sum(1 for d in mat if d in math) == 2 * len(math) + round(0.5 * len(math))
    assert sum(1 for d in mat if d in fortunes) == len(fortunes)
    assert not any(d in docs["train/enron-emails"] for d in mat)
    assert blend["materialized"]["documents"] == len(mat)
    run.ok(
        "build-shards", corpus, "--tokenizer", NEOX, "--output", tmp_path / "n", "--weights", "none", "--split", "1,0,0"
    )
    assert {
        r["epochs"] for r in json.loads((tmp_path / "n" / "blend.json").read_text())["splits"]["train"]["shards"]
    } == {1.0}


def test_premixed_input_warns(corpus, tmp_path, run):
    result = run.ok("build-shards", corpus / "mixed.jsonl", "--tokenizer", NEOX, "--output", tmp_path / "o")
    assert "mixes 2 components" in result.output and "already upsampled" in result.output
    assert (
        "mixes"
        not in run.ok(
            "build-shards", corpus / "mixed.jsonl", "--tokenizer", NEOX, "--output", tmp_path / "p", "--weights", "none"
        ).output
    )


def test_workers_and_ranks_give_identical_bytes(corpus, tmp_path, run):
    args = ["--tokenizer", NEOX, "--split", "90,5,5", "--part-size", "64K"]
    run.ok("build-shards", corpus, *args, "--output", tmp_path / "w1", "--workers", 1)
    run.ok("build-shards", corpus, *args, "--output", tmp_path / "w2", "--workers", 2)
    for rank in range(3):
        result = run.ok(
            "build-shards",
            corpus,
            *args,
            "--output",
            tmp_path / f"r{rank}",
            "--rank",
            rank,
            "--world-size",
            3,
            "--workers",
            1,
        )
        assert "merge-shards" in result.output and not (tmp_path / f"r{rank}" / "manifest.json").exists()
    incomplete = run("merge-shards", tmp_path / "r0", tmp_path / "r1", "--output", tmp_path / "bad")
    assert incomplete.exit_code == 1 and "not done yet" in incomplete.output
    run.ok("merge-shards", tmp_path / "r0", tmp_path / "r1", tmp_path / "r2", "--output", tmp_path / "merged")
    reference = tree_bytes(tmp_path / "w1")
    assert len(reference) >= 2 * 6 and tree_bytes(tmp_path / "w2") == reference
    assert tree_bytes(tmp_path / "merged") == reference


def test_a_part_not_written_whole_is_named_and_made_again(corpus, tmp_path, run):
    """A power cut can leave a committed part zeroed under its receipt. merge-shards names it; build-shards names
    it and removes it, and the same command run again encodes it anew: one clean run's shards."""
    args = ["--tokenizer", NEOX, "--split", "90,5,5", "--part-size", "64K", "--workers", 1]
    run.ok("build-shards", corpus, *args, "--output", tmp_path / "clean")
    out = tmp_path / "out"
    for rank in range(2):  # ranks leave every part committed and none joined
        run.ok("build-shards", corpus, *args, "--output", out, "--rank", rank, "--world-size", 2)
    receipt = out / ".parts" / "00000" / "receipt.json"  # valid JSON that lacks what the assembly reads
    whole = receipt.read_text()
    lacking = json.loads(whole)
    first = next(iter(lacking["shards"]))
    del lacking["skipped"], lacking["shards"][first]["tokens"]
    receipt.write_text(json.dumps(lacking))
    merged = run("merge-shards", out, "--output", tmp_path / "merged")
    assert merged.exit_code == 1 and not (tmp_path / "merged" / "manifest.json").exists()
    assert_clean_error(merged.output, f"{receipt}: cannot read", f"no skipped, {first} tokens", "run build-shards")
    receipt.write_text(whole)
    part = out / ".parts" / "00001"
    damaged = max(part.rglob("*.bin"), key=lambda f: f.stat().st_size)
    damaged.write_bytes(bytes(damaged.stat().st_size))
    merged = run("merge-shards", out, "--output", tmp_path / "merged")
    assert merged.exit_code == 1 and not (tmp_path / "merged" / "manifest.json").exists()
    assert_clean_error(merged.output, f"{damaged}: content differs", "run build-shards again for its --rank")
    failed = run("build-shards", corpus, *args, "--output", out)
    assert failed.exit_code == 1 and not part.exists() and not (out / "manifest.json").exists()
    assert_clean_error(failed.output, f"{damaged}: content differs", "the part is removed")
    again = run.ok("build-shards", corpus, *args, "--output", out)
    assert "encoding 1 of" in again.output and tree_bytes(out) == tree_bytes(tmp_path / "clean")


def test_hf_dataset_input_streams(tmp_path, run):
    """A Hugging Face dataset (here a local one, as no hub is reachable) is read with `datasets` streaming."""
    ds = tmp_path / "ds"
    ds.mkdir()
    write_jsonl(ds / "train.jsonl", [{"text": f"hello {i}", "meta": {"pile_set_name": "Pile-CC"}} for i in range(20)])
    run.ok("build-shards", f"hf:{ds}", "--tokenizer", NEOX, "--output", tmp_path / "o", "--split", "1,0,0")
    docs = shard_docs(tmp_path / "o")["train/pile-cc"]
    tok = Tokenizer.from_file(str(NEOX))
    assert docs == [tok.encode(f"hello {i}").ids + [0] for i in range(20)]


def gigatoken_off_by_one(monkeypatch) -> None:
    """Make gigatoken give one wrong id (in this process only: spawned workers are left as they are)."""
    from pile_tools import encoding as engine

    real = engine.Encoder.encode

    def wrong(self, texts):
        ids, counts = real(self, texts)
        if self.engine == "gigatoken":
            ids = ids.copy()
            ids[-1] += 1
        return ids, counts

    monkeypatch.setattr(engine.Encoder, "encode", wrong)


def test_engine_guard_falls_back_on_mismatch(monkeypatch):
    from pile_tools import encoding as engine

    gigatoken_off_by_one(monkeypatch)
    warnings = []
    assert engine.choose_engine(NEOX, ["some text", "more text"], warnings.append) == "fastokens"
    assert "gigatoken gives different ids" in warnings[0]


def test_workers_encode_while_the_check_runs_and_start_again_if_it_refuses(corpus, tmp_path, run, monkeypatch):
    """--workers 2 starts encoding with gigatoken while the exactness check runs beside it; when the check refuses
    gigatoken (here only the checking process gets a wrong id), the parts made with it are dropped and encoded
    again with the engine the check chose: the manifest names it, and the bytes are one worker's."""
    args = ["--tokenizer", NEOX, "--split", "90,5,5", "--part-size", "64K"]
    run.ok("build-shards", corpus, *args, "--output", tmp_path / "w1", "--workers", 1)
    gigatoken_off_by_one(monkeypatch)
    result = run.ok("build-shards", corpus, *args, "--output", tmp_path / "w2", "--workers", 2)
    assert "checked against tokenizers meanwhile" in result.output
    assert "gigatoken gives different ids" in result.output and "again with fastokens" in result.output
    manifest = json.loads((tmp_path / "w2" / "manifest.json").read_text())
    assert manifest["tokenizer"]["engine"] == ["fastokens"]
    assert tree_bytes(tmp_path / "w2") == tree_bytes(tmp_path / "w1")


@pytest.mark.slow
def test_sigkill_midway_then_rerun_is_identical(tmp_path, sample_docs, run):
    docs = [d for name in sorted(sample_docs) for d in sample_docs[name]]
    write_jsonl(tmp_path / "all.jsonl", docs)
    args = ["--tokenizer", NEOX, "--split", "90,5,5", "--part-size", "8K", "--workers", "1"]
    run.ok("build-shards", tmp_path / "all.jsonl", *args, "--output", tmp_path / "clean")
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "cli", "build-shards", str(tmp_path / "all.jsonl"), *args, "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
    committed = out / ".parts"  # NNNNN/ are committed parts; NNNNN.tmp-PID/ are not, receipt or not
    journal = committed / "joined.json"  # the joined parts, whose tokens are then only in the final shards
    deadline = time.time() + 120

    def part_0_joined() -> bool:  # the journal is written first, then the part's tokens removed: wait for both
        return journal.is_file() and not list(committed.glob("00000/*/*.bin"))

    while not (len(list(committed.glob("[0-9]????/receipt.json"))) >= 5 and part_0_joined()):
        assert time.time() < deadline, "no 5 committed parts and part 0 joined within 120 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(committed.glob("[0-9]????/receipt.json")))
    assert done >= 5 and not (out / "manifest.json").exists()
    joined = json.loads(journal.read_text())["joined"]
    assert joined >= 1 and not list(committed.glob("00000/*/*.bin"))  # part 0's tokens: in the shards alone
    total = json.loads((out / "plan.json").read_text())["parts"]
    assert done < len(total), "the run finished before it was killed; the test needs more parts"
    ranked = tmp_path / "ranked"  # the same state, finished by two ranks instead: joined parts are encoded again
    shutil.copytree(out, ranked)
    for rank in (0, 1):
        rerun = run.ok(
            "build-shards", tmp_path / "all.jsonl", *args, "--output", ranked, "--rank", rank, "--world-size", 2
        )
        assert rank or "were joined by a run without --world-size" in rerun.output
    run.ok("merge-shards", ranked, "--output", ranked)
    assert tree_bytes(ranked) == tree_bytes(tmp_path / "clean")
    result = run.ok("build-shards", tmp_path / "all.jsonl", *args, "--output", out)
    assert f"encoding {len(total) - done} of {len(total)} parts" in result.output
    assert tree_bytes(out) == tree_bytes(tmp_path / "clean")
    assert not (out / ".parts").exists()
    again = run.ok("build-shards", tmp_path / "all.jsonl", *args, "--output", out)
    assert "nothing to do" in again.output


# A process started in the background by a shell without job control (`make test &`) ignores SIGINT, and so do its
# children: the build is started with Python's Ctrl-C handler, as in a terminal.
CTRL_C = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
import cli
cli.main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_midway_finishes_the_parts_under_way_and_says_so(tmp_path, sample_docs, run, signum):
    """scancel's SIGTERM (or Ctrl-C, to the main process alone here): the workers finish the parts they hold, the
    build ends with one line saying how many parts are committed and exit status 128 + the signal, no traceback,
    no worker left; the same command goes on from there to the bytes of a build never stopped."""
    docs = [d for name in sorted(sample_docs) for d in sample_docs[name]]
    write_jsonl(tmp_path / "all.jsonl", docs)
    args = ["--tokenizer", NEOX, "--split", "90,5,5", "--part-size", "8K", "--workers", "2"]
    run.ok("build-shards", tmp_path / "all.jsonl", *args, "--output", tmp_path / "clean")
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-c", CTRL_C, "build-shards", tmp_path / "all.jsonl", *args, "--output", out]
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while len(list((out / ".parts").glob("[0-9]????/receipt.json"))) < 3:
        assert proc.poll() is None and time.time() < deadline, "no 3 committed parts within 120 s"
        time.sleep(0.02)
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signum)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signum, output[-3000:]
    total = len(json.loads((out / "plan.json").read_text())["parts"])
    done = len(list((out / ".parts").glob("[0-9]????/receipt.json")))
    assert f"{out}: stopped by {signal.Signals(signum).name} with {done} of {total} parts committed" in output
    assert "Traceback" not in output and not (out / "manifest.json").exists() and 3 <= done < total
    assert not psutil.wait_procs(workers, timeout=30)[1], "a worker outlived the build"
    again = run.ok("build-shards", tmp_path / "all.jsonl", *args, "--output", out)
    assert f"encoding {total - done} of {total} parts" in again.output
    assert tree_bytes(out) == tree_bytes(tmp_path / "clean")


HELD = """
import sys, time
from pathlib import Path
import pile_tools.build as build
holding, release, real = Path(sys.argv[1]), Path(sys.argv[2]), build.run_build
def held(*args, **kwargs):  # runs once the output's lock is taken
    holding.touch()
    while not release.exists():
        time.sleep(0.05)
    return real(*args, **kwargs)
build.run_build = held
import cli
cli.main(sys.argv[3:])
"""


@pytest.mark.parametrize("ranks", [[], ["--rank", "0", "--world-size", "2"]])
def test_a_second_build_on_the_same_output_is_refused_naming_the_first(corpus, tmp_path, run, ranks):
    """Two build-shards on one --output (or one rank of it) would delete each other's parts in progress and append
    to the same shards: the second is refused in one line naming the first, which finishes whole. Another rank
    of the same run works beside it."""
    out, holding, release = tmp_path / "out", tmp_path / "holding", tmp_path / "release"
    args = ["build-shards", corpus, "--tokenizer", NEOX, "--output", out, "--part-size", "64K", *ranks]
    first = subprocess.Popen(
        [sys.executable, "-c", HELD, holding, release, *map(str, args)], cwd=Path(__file__).parent.parent
    )
    try:
        deadline = time.time() + 120
        while not holding.exists():
            assert first.poll() is None and time.time() < deadline, "the first build did not start"
            time.sleep(0.05)
        second = run(*args)
        assert second.exit_code == 1
        assert_clean_error(
            second.output, f"{out}{' (rank 0)' if ranks else ''} is in use by another run: pid {first.pid}"
        )
        if ranks:  # the run's other rank
            run.ok(*args[: -len(ranks)], "--rank", "1", "--world-size", "2")
        release.touch()
        assert first.wait(timeout=300) == 0
    finally:  # never leave the first build waiting
        release.touch()
        if first.poll() is None:
            first.kill()
            first.wait()
    if ranks:
        run.ok("merge-shards", out, "--output", out)
    run.ok("verify", out)
    assert not list(out.glob(".lock*"))


def test_large_document_is_encoded_whole(tmp_path, run):
    """A 50 MB document streams through and round-trips; --max-doc-bytes skips and counts it instead."""
    block = "hello world\n"  # its pre-tokens do not merge across repeats, so the ids tile
    big = block * (50_000_000 // len(block))
    write_jsonl(tmp_path / "big.jsonl", [{"text": "small one"}, {"text": big}])
    run.ok("build-shards", tmp_path / "big.jsonl", "--tokenizer", NEOX, "--output", tmp_path / "o", "--split", "1,0,0")
    tok = Tokenizer.from_file(str(NEOX))
    docs = shard_docs(tmp_path / "o")["train/big"]
    unit = tok.encode(block).ids
    assert docs[1] == unit * (len(big) // len(block)) + [0]
    result = run.ok(
        "build-shards",
        tmp_path / "big.jsonl",
        "--tokenizer",
        NEOX,
        "--output",
        tmp_path / "s",
        "--split",
        "1,0,0",
        "--max-doc-bytes",
        "10M",
    )
    assert "big.jsonl:2: too long" in result.output
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["skipped"] == {"too_long": 1}
    assert np.array_equal(shard_docs(tmp_path / "s")["train/big"][0], tok.encode("small one").ids + [0])
