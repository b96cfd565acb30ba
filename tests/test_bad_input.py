"""Every kind of bad input: a clear message naming the file (and line), a counted skip or a clean failure."""

import json

import pytest
import zstandard
from helpers import NEOX, assert_clean_error, write_jsonl

GOOD = b'{"text": "a good document", "meta": {"pile_set_name": "Github"}}\n'


def build(run, *inputs, out, extra=()):
    return run("build-shards", *inputs, "--tokenizer", NEOX, "--output", out, "--split", "1,0,0", *extra)


def assert_clean_failure(result, out, *phrases):
    """Exit status 1, one 'Error:' line with the phrases, no traceback, no final outputs."""
    assert result.exit_code == 1, result.output
    assert_clean_error(result.output, "Error:", *phrases)
    assert not (out / "manifest.json").exists() and not list(out.glob("*/*.bin"))


BAD_LINES = {
    "invalid_json": (b'{"text": "unterminated\n', "invalid json"),
    "missing_text": (b'{"content": "no text field"}\n', "missing text"),
    "text_not_string": (b'{"text": ["a", "list"]}\n', "text not string"),
    "invalid_utf8": (b'{"text": "caf\xe9 latin-1"}\n', "invalid utf8"),
    "lone_surrogate": (b'{"text": "\\ud800 alone"}\n', "invalid utf8"),
    "empty": (b'{"text": ""}\n', "empty"),
    "not_an_object": (b'["text"]\n', "invalid json"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_is_skipped_counted_and_named(tmp_path, run, case):
    line, message = BAD_LINES[case]
    (tmp_path / "in.jsonl").write_bytes(GOOD + GOOD + line + GOOD)
    result = build(run, tmp_path / "in.jsonl", out=tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert f"in.jsonl:3: {message}" in result.output
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    reason = message.replace(" ", "_")
    assert manifest["skipped"] == {reason: 1}
    assert manifest["components"]["Github"]["splits"]["train"]["documents"] == 3


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_strict_makes_a_bad_line_fatal(tmp_path, run, case):
    line, message = BAD_LINES[case]
    (tmp_path / "in.jsonl").write_bytes(GOOD + line)
    result = build(run, tmp_path / "in.jsonl", out=tmp_path / "o", extra=["--strict"])
    assert_clean_failure(result, tmp_path / "o", f"in.jsonl:2: {message}", "--strict")


def test_bad_line_number_in_a_byte_range_part(tmp_path, run):
    """Line numbers stay true for parts cut out of the middle of a large file."""
    lines = [GOOD] * 3000 + [b"not json\n"] + [GOOD] * 10
    (tmp_path / "in.jsonl").write_bytes(b"".join(lines))
    result = build(run, tmp_path / "in.jsonl", out=tmp_path / "o", extra=["--part-size", "16K", "--workers", "2"])
    assert result.exit_code == 0 and "in.jsonl:3001: invalid json" in result.output


def test_truncated_zst_fails_cleanly(tmp_path, run):
    data = zstandard.ZstdCompressor().compress(GOOD * 20000)
    (tmp_path / "cut.jsonl.zst").write_bytes(data[: len(data) // 2])
    result = build(run, tmp_path / "cut.jsonl.zst", out=tmp_path / "o")
    assert_clean_failure(result, tmp_path / "o", "cut.jsonl.zst", "truncated zstd")


def test_non_zstd_file_named_zst_fails_cleanly(tmp_path, run):
    (tmp_path / "fake.jsonl.zst").write_bytes(GOOD * 10)
    result = build(run, tmp_path / "fake.jsonl.zst", out=tmp_path / "o", extra=["--workers", "2"])
    assert_clean_failure(result, tmp_path / "o", "fake.jsonl.zst", "not a valid zstd file")


def test_truncated_gz_fails_cleanly(tmp_path, run):
    write_jsonl(tmp_path / "x.jsonl.gz", [{"text": f"doc {i} " * 50} for i in range(2000)])
    data = (tmp_path / "x.jsonl.gz").read_bytes()
    (tmp_path / "x.jsonl.gz").write_bytes(data[: len(data) // 2])
    assert_clean_failure(build(run, tmp_path / "x.jsonl.gz", out=tmp_path / "o"), tmp_path / "o", "x.jsonl.gz")


def test_missing_input(tmp_path, run):
    result = build(run, tmp_path / "nowhere.jsonl.zst", out=tmp_path / "o")
    assert_clean_failure(result, tmp_path / "o", "nowhere.jsonl.zst: no such file or directory")
    assert not (tmp_path / "o").exists()


def test_empty_inputs(tmp_path, run):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert_clean_failure(build(run, tmp_path / "empty.jsonl", out=tmp_path / "o"), tmp_path / "o", "empty file")
    (tmp_path / "d").mkdir()
    assert_clean_failure(build(run, tmp_path / "d", out=tmp_path / "o"), tmp_path / "o", "directory holds no")
    (tmp_path / "blank.jsonl").write_bytes(b"\n\n")
    result = build(run, tmp_path / "blank.jsonl", out=tmp_path / "o")
    assert_clean_failure(result, tmp_path / "o", "no documents")


def test_output_holding_another_run_is_refused(tmp_path, run):
    (tmp_path / "a.jsonl").write_bytes(GOOD * 3)
    (tmp_path / "b.jsonl").write_bytes(GOOD * 4)
    assert build(run, tmp_path / "a.jsonl", out=tmp_path / "o").exit_code == 0
    before = {p: p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file()}
    result = build(run, tmp_path / "b.jsonl", out=tmp_path / "o")
    assert result.exit_code == 1
    assert_clean_error(result.output, "holds the shards of a different run")
    assert {p: p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file()} == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    result = build(run, tmp_path / "a.jsonl", out=tmp_path / "other")
    assert result.exit_code == 1
    assert_clean_error(result.output, "not empty and holds no neox-data run")


def test_bad_tokenizer_and_options(tmp_path, run):
    (tmp_path / "a.jsonl").write_bytes(GOOD)
    result = run("build-shards", tmp_path / "a.jsonl", "--tokenizer", tmp_path / "nope", "--output", tmp_path / "o")
    assert result.exit_code == 1
    assert_clean_error(result.output, "tokenizer not found")
    (tmp_path / "t.json").write_text("{}")
    result = run("build-shards", tmp_path / "a.jsonl", "--tokenizer", tmp_path / "t.json", "--output", tmp_path / "o")
    assert result.exit_code == 1
    assert_clean_error(result.output, "not a readable HF tokenizers file")
    result = build(run, tmp_path / "a.jsonl", out=tmp_path / "o", extra=["--split", "a,b"])
    assert result.exit_code == 1
    assert_clean_error(result.output, "--split")
    result = build(
        run, tmp_path / "a.jsonl", out=tmp_path / "o", extra=["--weights", tmp_path / "t.json", "--rank", "0"]
    )
    assert result.exit_code == 0, result.output  # {} is a valid (empty) table: every component gets 1.0
    result = build(run, tmp_path / "a.jsonl", out=tmp_path / "p", extra=["--weights", "heavy"])
    assert result.exit_code == 1
    assert_clean_error(result.output, "--weights")


def test_output_that_is_a_file_and_a_missing_dataset(tmp_path, run):
    (tmp_path / "a.jsonl").write_bytes(GOOD)
    (tmp_path / "taken").write_text("a file")
    result = build(run, tmp_path / "a.jsonl", out=tmp_path / "taken")
    assert result.exit_code == 2 and "is a file" in result.output and (tmp_path / "taken").read_text() == "a file"
    result = run("build-shards", f"hf:{tmp_path}/no-such-dataset", "--tokenizer", NEOX, "--output", tmp_path / "o")
    assert result.exit_code == 1
    assert_clean_error(result.output, "not a local file or directory")
    assert build(run, tmp_path / "a.jsonl", out=tmp_path / "o").exit_code == 0, (
        "a failed start does not block the directory"
    )


@pytest.mark.parametrize("item", ["pile_tools/nosuch", "./nosuch", "nosuch.jsonl.zst", "/data/pile/nosuch"])
def test_a_missing_local_path_fails_at_once_without_the_hub(run, tmp_path, monkeypatch, item):
    import socket
    import time

    def no_network(*args, **kwargs):
        raise AssertionError("a local path went to the network")

    def no_wait(seconds):  # the hub libraries' retries wait between attempts: "at once" is no wait at all
        raise AssertionError(f"waited {seconds} s before failing")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(time, "sleep", no_wait)
    result = run("build-shards", item, "--tokenizer", NEOX, "--output", tmp_path / "o")
    assert result.exit_code == 1
    assert_clean_error(result.output, f"{item}: no such file or directory")


def test_an_unreachable_hub_dataset_fails_at_the_first_try_naming_it(run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run("build-shards", "EleutherAI/no-such-pile", "--tokenizer", NEOX, "--output", tmp_path / "o")
    assert result.exit_code == 1
    assert_clean_error(result.output, "EleutherAI/no-such-pile: a Hugging Face dataset, but HF_HUB_OFFLINE is set")
    assert "encoding" not in result.output  # refused before any work


def test_split_needs_three_weights(run, tmp_path):
    (tmp_path / "a.jsonl").write_bytes(GOOD)
    result = run(
        "build-shards", tmp_path / "a.jsonl", "--tokenizer", NEOX, "--output", tmp_path / "o", "--split", "90,5"
    )
    assert result.exit_code == 1
    assert_clean_error(result.output, "--split '90,5': give 3 non-negative weights")
