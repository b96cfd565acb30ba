"""Where did this token come from: the source map build-shards keeps, `batch --sources` and `--epochs`, and
`decontaminate` finding a planted passage by file and line."""

import gzip
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import zstandard
from helpers import NEOX, ROOT, SAMPLE, Cli, assert_clean_error, read_jsonl_zst, tree_bytes, write_jsonl
from tokenizers import Tokenizer

from pile_tools.indexed import Shard
from pile_tools.shards_dir import read_manifest
from pile_tools.sourcemap import SourceMap

EOD = 0  # GPT-NeoX-20B's <|endoftext|>
TINY = ["--config", ROOT / "configs" / "tiny.yml"]
PASSAGES = ROOT / "trainer" / "eval_tasks" / "persuasion_passages.jsonl"


def input_lines(path: str) -> list[bytes]:
    """The lines of an input file, decompressed, read without pile_tools."""
    raw = Path(path).read_bytes()
    if path.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    elif path.endswith(".gz"):
        raw = gzip.decompress(raw)
    return raw.split(b"\n")


def text_at(path: str, line: int) -> str:
    """The document at an input's line: a .txt file's whole text (line 1), else that line's JSON text."""
    if path.endswith(".txt"):
        assert line == 1
        return Path(path).read_text()
    return json.loads(input_lines(path)[line - 1])["text"]


def document_ids(tokenizer: Tokenizer, path: str, line: int) -> list[int]:
    """A document as its shard holds it: its text encoded, then EOD."""
    return tokenizer.encode(text_at(path, line)).ids + [EOD]


def build(run, inputs, out: Path, *extra) -> Path:
    run.ok("build-shards", inputs, "--tokenizer", NEOX, "--output", out, "--split", "80,10,10", *extra)
    return out


def test_every_document_maps_to_its_input_file_and_line(corpus, run, tmp_path):
    """zst, gz, a plain .jsonl cut into byte ranges (each a part of its own) and a .txt: each shard's document i
    is its file's line, encoded; the map sits beside the shards, and verify checks it."""
    out = build(run, corpus, tmp_path / "out", "--part-size", 20_000, "--workers", 2)
    tokenizer, manifest = Tokenizer.from_file(str(NEOX)), read_manifest(out)
    sources, seen = SourceMap(out, manifest), set()
    for component in manifest["components"].values():
        for entry in component["splits"].values():
            shard = Shard(out / entry["prefix"])
            for doc in range(len(shard)):
                file, line = sources.locate(entry["prefix"], doc)
                assert shard[doc].tolist() == document_ids(tokenizer, file, line), (entry["prefix"], doc)
                seen.add((file, line))
    inputs = [i["path"] for i in manifest["inputs"]]
    assert {Path(f).name for f, _ in seen} == {p.name for p in corpus.iterdir()}
    assert len([(f, n) for f, n in seen if f.endswith("mixed.jsonl")]) == 50  # every line of the cut file, once
    assert manifest["parts"] > len(inputs)  # the plain .jsonl was cut into several parts
    assert run.ok("verify", out).output.rstrip().endswith("ok")


def test_rank_builds_merged_keep_the_same_map(corpus, run, tmp_path):
    """Two --rank builds merged give the source map (and shards) of one process."""
    one = build(run, corpus, tmp_path / "one", "--part-size", 20_000)
    for rank in (0, 1):
        build(run, corpus, tmp_path / f"rank{rank}", "--part-size", 20_000, "--rank", rank, "--world-size", 2)
    run.ok("merge-shards", tmp_path / "rank0", tmp_path / "rank1", "--output", tmp_path / "merged")
    merged = tmp_path / "merged"
    assert tree_bytes(merged) == tree_bytes(one)
    lines = {str(p.relative_to(one)): p.read_bytes() for p in one.rglob("*.lines.npy")}
    assert lines and lines == {str(p.relative_to(merged)): p.read_bytes() for p in merged.rglob("*.lines.npy")}
    maps = [
        {e["prefix"]: e["source_map"] for c in read_manifest(d)["components"].values() for e in c["splits"].values()}
        for d in (one, merged)
    ]
    assert maps[0] == maps[1]


def test_verify_names_a_damaged_source_map(corpus, run, tmp_path):
    out = build(run, corpus, tmp_path / "out")
    lines = out / "train" / "dm-mathematics.lines.npy"
    np.save(lines, np.load(lines)[:-1])  # one document short
    result = run("verify", out)
    assert result.exit_code == 1
    assert_clean_error(result.output, str(lines), "lines for the shard's", "differs from the xxh3-128")


@pytest.fixture(scope="module")
def short_shards(tmp_path_factory) -> Path:
    """Short documents (Enron mails: half under 250 tokens), middling (Fortunes) and long ones (books)."""
    root = tmp_path_factory.mktemp("short")
    for name in ("Fortunes.jsonl.zst", "Enron_Emails.jsonl.zst", "Gutenberg_PG_19.jsonl.zst"):
        shutil.copy(SAMPLE / name, root / name)
    return build(Cli(), root, root / "shards")


def test_batch_sources_rebuild_each_sample_from_the_input_lines(short_shards):
    """Over several steps, every sample's tokens are the concatenation of its sources' ranges of each document as
    read from its input file's line; one sample at least spans 3 documents."""
    tokenizer, widest, longer = Tokenizer.from_file(str(NEOX)), 0, ["--set", "seq_length=512"]
    for step in (1, 2, 7, 50):
        shown = json.loads(
            Cli().ok("batch", *TINY, "--data", short_shards, "--step", step, "--sources", "--json", *longer).output
        )
        assert shown["step"] == step and len(shown["samples"]) == 8
        for sample in shown["samples"]:
            rebuilt = []
            for source in sample["sources"]:
                start, end = source["tokens"]
                rebuilt += document_ids(tokenizer, source["file"], source["line"])[start:end]
                assert source["component"] in ("Fortunes", "Enron Emails", "Gutenberg (PG-19)")
                assert Path(source["shard"]).parent.name == "train"
            assert rebuilt == sample["tokens"] and len(rebuilt) == 513
            widest = max(widest, len(sample["sources"]))
    assert widest >= 3


def test_batch_sources_as_text(short_shards):
    result = Cli().ok("batch", *TINY, "--data", short_shards, "--step", 3, "--sources", "--decode", "--chars", 40)
    assert result.output.count("--- step 3 sample") == 8
    rows = re.findall(r"document (\d+)  tokens (\d+)-(\d+)  (\S+\.jsonl\.zst):(\d+)\n    (.*)\n", result.output)
    assert len(rows) >= 8 and all(int(a) < int(b) and int(line) >= 1 and text for _, a, b, _, line, text in rows)


def test_epoch_steps_are_where_batch_first_reads_a_second_copy(tmp_path):
    """A small source read for several epochs: the step `--epochs` gives for epoch k of a shard is the first step
    whose `batch --sources` shows some document's k-th distinct copy (copies counted in the order first read)."""
    root = tmp_path / "small"
    root.mkdir()
    for name in ("Enron_Emails.jsonl.zst", "Fortunes.jsonl.zst"):
        write_jsonl(root / name.replace(".zst", ""), read_jsonl_zst(SAMPLE / name)[:12])
    data = build(Cli(), root, tmp_path / "shards")
    steps, micro = 40, "train_micro_batch_size_per_gpu=16"
    overrides = ["--set", f"train_iters={steps}", "--set", "seq_length=64", "--set", micro]
    shown = json.loads(Cli().ok("batch", *TINY, "--data", data, "--epochs", "--json", *overrides).output)
    reported = {row["shard"]: row["epochs"] for row in shown["shards"]}
    copies: dict = {}  # shard -> document -> copies in the order first read
    for step in range(1, steps + 1):
        batch = Cli().ok("batch", *TINY, "--data", data, "--step", step, "--sources", "--json", *overrides)
        for sample in json.loads(batch.output)["samples"]:
            for source in sample["sources"]:
                seen = copies.setdefault(source["shard"], {}).setdefault(source["document"], {})
                seen.setdefault(source["copy"], step)
    for shard, documents in copies.items():
        ranked = [sorted(first.values()) for first in documents.values()]
        expected = [min(r[k] for r in ranked if len(r) > k) for k in range(max(map(len, ranked)))]
        assert reported[shard] == expected, shard
    assert max(len(e) for e in reported.values()) >= 3  # several epochs were read


def test_batch_wants_a_step_or_epochs(short_shards):
    result = Cli()("batch", *TINY, "--data", short_shards)
    assert result.exit_code == 2 and "give --step N" in result.output


def plant(root: Path, passage: str) -> tuple[Path, int]:
    """The passage put at the end of one book of an input file; (the file, the book's line)."""
    docs = read_jsonl_zst(SAMPLE / "Gutenberg_PG_19.jsonl.zst")
    line = 3
    docs[line - 1] = {**docs[line - 1], "text": docs[line - 1]["text"] + "\n\n" + passage + "\n"}
    return write_jsonl(root / "Gutenberg_PG_19.jsonl", docs), line


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, Path, Path, int]:
    """(clean shards, shards with a planted passage, the planted file, its line) of three components."""
    root = tmp_path_factory.mktemp("planted")
    clean, dirty = root / "clean", root / "dirty"
    clean.mkdir(), dirty.mkdir()
    for name in ("Enron_Emails.jsonl.zst", "Fortunes.jsonl.zst"):
        shutil.copy(SAMPLE / name, clean / name)
        shutil.copy(SAMPLE / name, dirty / name)
    write_jsonl(clean / "Gutenberg_PG_19.jsonl", read_jsonl_zst(SAMPLE / "Gutenberg_PG_19.jsonl.zst"))
    rows = [json.loads(line) for line in PASSAGES.read_text().splitlines()]
    passage = next(r["text"] for r in rows if r["split"] == "test")  # an evaluation item of the task
    file, line = plant(dirty, passage)
    cli = Cli()
    return build(cli, clean, root / "clean-shards"), build(cli, dirty, root / "dirty-shards"), file, line


def contamination(data: Path, out: Path, *against, workers: int = 0) -> dict:
    tasks = [a for x in against for a in ("--against", x)]
    result = Cli().ok("decontaminate", data, *tasks, "--output", out, "--workers", workers)
    assert "report in" in result.output and (out / "report.md").is_file()
    return json.loads((out / "report.json").read_text())


def test_decontaminate_finds_a_planted_passage_by_file_and_line(planted, tmp_path):
    clean, dirty, file, line = planted
    report = contamination(dirty, tmp_path / "dirty", "neox_books_wordperplexity", "neox_books_lastword")
    task = report["tasks"]["neox_books_wordperplexity"]
    assert task["documents"] == 1 and task["tokens"] > 0
    (match,) = task["matches"]
    assert (match["file"], match["line"], match["component"]) == (str(file.resolve()), line, "Gutenberg (PG-19)")
    (row,) = task["by_shard"]
    assert row["component"] == "Gutenberg (PG-19)" and row["documents"] == 1
    assert match["split"] == row["split"] and match["shard"] == row["shard"]
    shard = Shard(dirty / row["shard"])
    assert row["tokens"] == len(shard[match["document"]])
    assert report["tasks"]["neox_books_lastword"]["documents"] == 0  # the other half of the book
    assert "Gutenberg (PG-19)" in (tmp_path / "dirty" / "report.md").read_text()
    clean_report = contamination(clean, tmp_path / "clean", "neox_books_wordperplexity")
    assert clean_report["tasks"]["neox_books_wordperplexity"]["documents"] == 0
    as_file = contamination(dirty, tmp_path / "file", str(PASSAGES))  # the task's own file: the same document
    assert as_file["tasks"][str(PASSAGES)]["matches"][0]["line"] == line


def test_decontaminate_a_merged_rank_build_gives_the_same_report(planted, tmp_path, monkeypatch):
    """The same report from a 2-rank build merged, scanned by 2 worker processes in small jobs, as from one
    process's build scanned here."""
    import trainer.contamination

    _, dirty, file, _ = planted
    inputs = file.parent
    for rank in (0, 1):
        build(Cli(), inputs, tmp_path / f"rank{rank}", "--rank", rank, "--world-size", 2, "--part-size", 100_000)
    Cli().ok("merge-shards", tmp_path / "rank0", tmp_path / "rank1", "--output", tmp_path / "merged")
    one = contamination(dirty, tmp_path / "one", "neox_books_wordperplexity", workers=1)
    monkeypatch.setattr(trainer.contamination, "JOB_TOKENS", 20_000)  # dozens of jobs, on the pool
    merged = contamination(tmp_path / "merged", tmp_path / "two", "neox_books_wordperplexity", workers=2)
    assert one["tasks"] == merged["tasks"] and one["tasks"]["neox_books_wordperplexity"]["documents"] == 1


def test_decoding_by_table_equals_tokenizers(tmp_path):
    """decontaminate's decoder gives the bytes `tokenizers` decodes, for GPT-NeoX-20B (its multi-space tokens
    too) and GPT-2, on real text."""
    from pile_tools.ngrams import SEPARATOR, ByteDecoder

    names = ("Github.jsonl.zst", "Enron_Emails.jsonl.zst")
    texts = [d["text"] for name in names for d in read_jsonl_zst(SAMPLE / name)]
    for name in ("gpt-neox-20b", "gpt2"):
        path = ROOT / "tokenizer" / "assets" / name / "tokenizer.json"
        tokenizer = Tokenizer.from_file(str(path))
        eod = tokenizer.token_to_id("<|endoftext|>")
        decoder = ByteDecoder(path, eod)
        for text in texts[:40]:
            ids = np.array(tokenizer.encode(text).ids + [eod])
            assert decoder(ids) == tokenizer.decode(ids[:-1].tolist()).encode() + SEPARATOR


def test_decontaminate_refuses_bad_input(planted, tmp_path):
    clean, *_ = planted
    result = Cli()("decontaminate", clean, "--against", "no_such_task_anywhere", "--output", tmp_path / "r")
    assert result.exit_code == 1
    assert_clean_error(result.output, "no_such_task_anywhere")
    result = Cli()("decontaminate", tmp_path, "--against", str(PASSAGES), "--output", tmp_path / "r")
    assert result.exit_code == 1
    assert_clean_error(result.output, "no manifest.json")
    result = Cli()("decontaminate", clean, "--against", tmp_path, "--output", tmp_path / "r")
    assert result.exit_code == 1
    assert_clean_error(result.output, str(tmp_path), "a directory")
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "too short"}\n')
    result = Cli()("decontaminate", clean, "--against", short, "--output", tmp_path / "r")
    assert result.exit_code == 1
    assert_clean_error(result.output, str(short), "no 13-gram")


def test_batch_sources_without_a_source_map_say_so(short_shards, tmp_path):
    """Shards another tool made (no manifest.json here): documents and ranges still, file and line null, one
    warning naming the shard."""
    bare = tmp_path / "bare"
    shutil.copytree(short_shards, bare, ignore=shutil.ignore_patterns("index-cache", "manifest.json", "*.lines.npy"))
    result = Cli().ok("batch", *TINY, "--data", bare, "--step", 1, "--sources", "--json")
    lines = result.output.splitlines()
    warning = [line for line in lines if line.startswith("warning: no source map for")]
    assert len(warning) == 1 and str(bare) in warning[0]
    shown = json.loads(next(line for line in lines if line.startswith("{")))
    sources = [s for sample in shown["samples"] for s in sample["sources"]]
    assert sources and all(s["file"] is None and s["line"] is None and s["document"] >= 0 for s in sources)


def test_a_document_holding_a_nul_word_is_still_scanned(tmp_path):
    """A NUL standing alone in a text reads like decontaminate's document boundary: that chunk is scanned a
    document at a time, and the passage in it (and the one in the next document) is still found."""
    rows = [json.loads(line) for line in PASSAGES.read_text().splitlines()]
    passages = [r["text"] for r in rows if r["split"] == "test"][:2]
    docs = read_jsonl_zst(SAMPLE / "Enron_Emails.jsonl.zst")[:6]
    docs[2] = {"text": "a record \x00 with a NUL\n\n" + passages[0]}
    docs[4] = {"text": passages[1]}
    root = tmp_path / "in"
    root.mkdir()
    write_jsonl(root / "mails.jsonl", docs)
    data = build(Cli(), root, tmp_path / "shards", "--split", "1,0,0")
    report = contamination(data, tmp_path / "report", str(PASSAGES), workers=1)
    assert sorted(m["line"] for m in report["tasks"][str(PASSAGES)]["matches"]) == [3, 5]


def test_a_parts_damaged_source_map_is_named_and_made_anew(corpus, run, tmp_path):
    """A committed part's .lines.npy that is not what its receipt records (zeroed behind a whole header, as a power
    cut after the rename can leave it) stops the merge with one line naming it; removing that part and running
    its rank again gives the map of an undamaged build."""
    one = build(run, corpus, tmp_path / "one", "--part-size", 20_000)
    ranks = tmp_path / "ranks"
    for rank in (0, 1):
        build(run, corpus, ranks, "--part-size", 20_000, "--rank", rank, "--world-size", 2)
    damaged = sorted((ranks / ".parts").glob("0000[0-9]/*/*.lines.npy"))[0]
    np.save(damaged, np.zeros_like(np.load(damaged)))
    result = run("merge-shards", ranks, "--output", ranks)
    assert result.exit_code == 1
    assert_clean_error(result.output, str(damaged), "remove", "run build-shards again")
    part = damaged.parent.parent
    shutil.rmtree(part)
    build(run, corpus, ranks, "--part-size", 20_000, "--rank", int(part.name) % 2, "--world-size", 2)
    run.ok("merge-shards", ranks, "--output", ranks)
    assert tree_bytes(ranks) == tree_bytes(one)
