"""Helpers shared by the tests: corpus files in every input format, an independent reader, a CLI runner."""

import gzip
import io
import json
from pathlib import Path

import orjson
import zstandard
from click.testing import CliRunner

import cli

SAMPLE = Path(__file__).parent.parent / "pile_tools" / "sample"
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
    """Every shard file's bytes, by relative path: what must be identical between equivalent runs."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.suffix in (".bin", ".idx")}
