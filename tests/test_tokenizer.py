"""train-tokenizer and compare-tokenizers on real text, checked against `tokenizers` and the released file."""

import json
import unicodedata

import numpy as np
import pytest
from helpers import NEOX, SAMPLE, write_jsonl
from tokenizers import Tokenizer

from tokenizer.metrics import byte_decoder, renyi_efficiency, unreachable_ids, words_in
from tokenizer.train import SPLITTER

VOCAB = 1200


@pytest.fixture(scope="module")
def fixture_texts(sample_docs) -> list[str]:
    """About 1 MB of real text from every bundled component."""
    texts = []
    for docs in sample_docs.values():
        budget = 180_000
        for d in docs:
            texts.append(d["text"][:budget])
            budget -= len(texts[-1])
            if budget <= 0:
                break
    return texts + ["a" + " " * 25 + "b", "x\u0065\u0301y caf\u00e9", "tabs\t\tand\n\n\nlines  "]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_docs, fixture_texts):
    root = tmp_path_factory.mktemp("tok")
    write_jsonl(root / "fixture.jsonl", [{"text": t} for t in fixture_texts])
    from click.testing import CliRunner

    import cli

    for name in ("a", "b"):
        args = ["train-tokenizer", root / "fixture.jsonl", "--output", root / name, "--vocab-size", VOCAB, "--seed", 7]
        result = CliRunner().invoke(cli.main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    return root


def test_layout_matches_the_released_file(trained):
    ours = json.loads((trained / "a" / "tokenizer.json").read_text())
    released = json.loads(Tokenizer.from_file(str(NEOX)).to_str())  # defaults spelled out, as ours are
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert ours[key] == released[key], key
    tok = Tokenizer.from_file(str(trained / "a" / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB
    assert tok.id_to_token(0) == "<|endoftext|>" and tok.id_to_token(1) == "<|padding|>"
    assert [tok.id_to_token(VOCAB - 23 + k) for k in range(23)] == [" " * n for n in range(24, 1, -1)]
    ours_added = [{k: v for k, v in t.items() if k != "id"} for t in ours["added_tokens"]]
    released_added = [{k: v for k, v in t.items() if k != "id"} for t in released["added_tokens"]]
    assert ours_added == released_added
    assert set(ours["model"]["vocab"]) >= set(byte_decoder()), "all 256 bytes are in the alphabet"
    assert tok.encode("a" + " " * 4 + "b").tokens == ["a", " " * 4, "b"]
    assert tok.encode("a" + " " * 25 + "b").tokens == ["a", " " * 24, "Ġb"]


def test_round_trip_is_nfc(trained, fixture_texts):
    tok = Tokenizer.from_file(str(trained / "a" / "tokenizer.json"))
    for text in fixture_texts:
        assert tok.decode(tok.encode(text).ids) == unicodedata.normalize("NFC", text)


def dead_tokens(tok) -> list[str]:
    """Learned tokens whose own string, encoded, does not give the token."""
    decoder, dead = byte_decoder(), []
    for token, i in tok.get_vocab(with_added_tokens=False).items():
        if len(token) == 1 or token.startswith("<|"):  # a byte, or a special token: not learned
            continue
        try:
            text = bytes(decoder[c] for c in token).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if tok.encode(text).ids != [i]:
            dead.append(token)
    return dead


def test_no_dead_tokens_unlike_the_released_file(trained):
    assert dead_tokens(Tokenizer.from_file(str(trained / "a" / "tokenizer.json"))) == []
    released = dead_tokens(Tokenizer.from_file(str(NEOX)))
    assert len(released) == 221 and all("ĠĠ" in t for t in released)


def test_same_seed_same_bytes_and_report(trained):
    assert (trained / "a" / "tokenizer.json").read_bytes() == (trained / "b" / "tokenizer.json").read_bytes()
    report = json.loads((trained / "a" / "train_report.json").read_text())
    assert report["vocabulary"]["total"] == VOCAB and report["vocabulary"]["merges_with_two_adjacent_spaces"] == 0
    assert report["components"]["fixture"]["used_documents"] > 0


def test_auto_tokenizer_gives_the_same_ids(trained, fixture_texts):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(trained / "a")
    tok = Tokenizer.from_file(str(trained / "a" / "tokenizer.json"))
    for text in fixture_texts[:40]:
        assert auto(text)["input_ids"] == tok.encode(text).ids
    assert auto.eos_token_id == 0 and auto.pad_token_id == 1


def test_add_prefix_space_and_weighted_sampling(tmp_path, run, sample_docs):
    docs = [d for name in ("Fortunes.jsonl.zst", "DM_Mathematics.jsonl.zst") for d in sample_docs[name]]
    write_jsonl(tmp_path / "two.jsonl", docs)
    weights = tmp_path / "w.json"
    weights.write_text(json.dumps({"Fortunes": 3, "DM Mathematics": 1}))
    run.ok(
        "train-tokenizer",
        tmp_path / "two.jsonl",
        "--output",
        tmp_path / "t",
        "--vocab-size",
        700,
        "--add-prefix-space",
        "--max-bytes",
        "200K",
        "--component-weights",
        weights,
    )
    config = json.loads((tmp_path / "t" / "tokenizer.json").read_text())
    assert config["pre_tokenizer"]["add_prefix_space"] is True
    tok = Tokenizer.from_file(str(tmp_path / "t" / "tokenizer.json"))
    assert tok.encode("Hello").ids == tok.encode(" Hello").ids
    c = json.loads((tmp_path / "t" / "train_report.json").read_text())["components"]
    fortunes, math = c["Fortunes"]["used_bytes"], c["DM Mathematics"]["used_bytes"]
    share = 3 * c["Fortunes"]["bytes"] / (3 * c["Fortunes"]["bytes"] + c["DM Mathematics"]["bytes"])
    assert fortunes + math == pytest.approx(200 * 1024, rel=0.25)
    assert fortunes / (fortunes + math) == pytest.approx(share, abs=0.1)


def test_too_small_a_corpus_for_the_vocabulary(tmp_path, run):
    write_jsonl(tmp_path / "tiny.jsonl", [{"text": "just a few words"}])
    result = run("train-tokenizer", tmp_path / "tiny.jsonl", "--output", tmp_path / "t")
    assert result.exit_code == 1 and "give more text or a smaller vocabulary" in result.output
    assert not (tmp_path / "t" / "tokenizer.json").exists()


def test_splitter_cuts_where_the_space_tokens_match(trained):
    """Training cuts the text exactly where encoding matches an added token."""
    tok = Tokenizer.from_file(str(trained / "a" / "tokenizer.json"))
    for text in ["a" + " " * n + "b" for n in range(1, 60)] + ["x <|endoftext|>y  <|padding|>", "   \n  \t   z"]:
        added = [
            t
            for t in tok.encode(text).tokens
            if t in {" " * n for n in range(2, 25)} | {"<|endoftext|>", "<|padding|>"}
        ]
        assert [m.group() for m in SPLITTER.finditer(text)] == added, repr(text)


def test_compare_counts_equal_tokenizers(tmp_path, run, sample_docs):
    docs = sample_docs["Github.jsonl.zst"][:10] + sample_docs["Fortunes.jsonl.zst"][:10]
    write_jsonl(tmp_path / "c.jsonl", docs)
    run.ok(
        "compare-tokenizers",
        tmp_path / "c.jsonl",
        "--tokenizer",
        "gpt-neox-20b",
        "--tokenizer",
        NEOX.parent,
        "--output",
        tmp_path / "r",
    )
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["baseline"] == "gpt2" and report["tokenizers"] == ["gpt2", "gpt-neox-20b"]
    ws = set(" \t\n\r\x0b\x0c")
    for name, path in (("gpt2", SAMPLE.parent.parent / "tokenizer/assets/gpt2/tokenizer.json"), ("gpt-neox-20b", NEOX)):
        tok = Tokenizer.from_file(str(path))
        for component in ("Github", "Fortunes"):
            texts = [d["text"] for d in docs if d["meta"]["pile_set_name"] == component]
            encs = [tok.encode(t, add_special_tokens=False) for t in texts]
            entry = report["components"][component]
            assert entry["documents"] == 10 and entry["bytes"] == sum(len(t.encode()) for t in texts)
            assert entry["tokens"][name] == sum(len(e.ids) for e in encs)
            no_ws = sum(1 for e in encs for i in e.ids if not set(tok.decode([i])) <= ws or not tok.decode([i]))
            assert entry["tokens_excluding_whitespace"][name] == no_ws
    github = report["components"]["Github"]["tokens"]
    assert github["gpt-neox-20b"] < github["gpt2"], "NeoX's space-run tokens pay off on 4-space-indented code"
    for name in ("report.md", "report.csv", "compression.png"):
        assert (tmp_path / "r" / name).stat().st_size > 0
    assert "gpt-neox-20b / gpt2" in (tmp_path / "r" / "report.md").read_text()
    assert np.isclose(
        report["total"]["tokens"]["gpt2"], sum(e["tokens"]["gpt2"] for e in report["components"].values())
    )


def test_bad_lines_are_named_and_counted(tmp_path, run, sample_docs):
    good = b"".join(json.dumps({"text": d["text"]}).encode() + b"\n" for d in sample_docs["Fortunes.jsonl.zst"][:40])
    (tmp_path / "in.jsonl").write_bytes(good + b'{"text": 5}\n' + b"not json\n")
    result = run.ok("train-tokenizer", tmp_path / "in.jsonl", "--output", tmp_path / "t", "--vocab-size", 600)
    assert "in.jsonl:41: text not string" in result.output and "in.jsonl:42: invalid json" in result.output
    report = json.loads((tmp_path / "t" / "train_report.json").read_text())
    assert report["skipped"] == {"text_not_string": 1, "invalid_json": 1}
    strict = run("train-tokenizer", tmp_path / "in.jsonl", "--output", tmp_path / "s", "--vocab-size", 600, "--strict")
    assert strict.exit_code == 1 and "in.jsonl:41" in strict.output and not (tmp_path / "s" / "tokenizer.json").exists()
    result = run.ok(
        "compare-tokenizers", tmp_path / "in.jsonl", "--tokenizer", "gpt-neox-20b", "--output", tmp_path / "c"
    )
    assert "in.jsonl:42: invalid json" in result.output
    assert json.loads((tmp_path / "c" / "report.json").read_text())["skipped"] == {
        "text_not_string": 1,
        "invalid_json": 1,
    }


def test_without_max_bytes_every_capped_byte_is_used_once(tmp_path, run, sample_docs):
    docs = sample_docs["Fortunes.jsonl.zst"] + sample_docs["Gutenberg_PG_19.jsonl.zst"][:3]  # some over the cap
    write_jsonl(tmp_path / "in.jsonl", docs)
    run.ok(
        "train-tokenizer",
        tmp_path / "in.jsonl",
        "--output",
        tmp_path / "t",
        "--vocab-size",
        600,
        "--component-weights",
        "none",
        "--split",
        "1,0,0",  # none held out: every document is trained on
    )
    report = json.loads((tmp_path / "t" / "train_report.json").read_text())
    cap, components = report["document_cap_bytes"], report["components"].values()
    assert all(c["used_documents"] == c["documents"] and c["used_bytes"] == c["bytes"] for c in components)
    capped = sum(min(len(d["text"].encode()), cap) for d in docs)
    assert report["used_bytes"] == report["budget_bytes"] == capped < sum(len(d["text"].encode()) for d in docs)


GPT2 = NEOX.parent.parent / "gpt2" / "tokenizer.json"


def test_unreachable_ids_the_published_221_in_the_released_file_none_in_gpt2_or_ours(trained):
    """Land & Bartolo's count for GPT-NeoX-20B (the multi-space and newline-plus-space merges its added space
    tokens pre-empt), none for GPT-2's, none for one trained here, which train_report.json states."""
    released = unreachable_ids(NEOX)
    tok = Tokenizer.from_file(str(NEOX))
    assert len(released) == 221 and {tok.id_to_token(i) for i in released} == set(dead_tokens(tok))
    assert unreachable_ids(GPT2) == [] and unreachable_ids(trained / "a" / "tokenizer.json") == []
    held = json.loads((trained / "a" / "train_report.json").read_text())["held_out"]
    assert held["unreachable_ids"] == [] and held["split"] == "995,4,1"


class Garbled:
    """An encoder that gets every text wrong: a fast engine's ids only choose what `tokenizers` encodes again."""

    def encode(self, texts):
        return np.zeros(2 * len(texts), np.uint32), np.full(len(texts), 2)


def test_unreachable_ids_through_a_fast_engine_are_those_of_tokenizers_alone():
    """compare-tokenizers passes its (checked) engine; `tokenizers` still decides every id that engine doubts."""
    from pile_tools.encoding import Encoder

    for path in (NEOX, GPT2):
        alone = unreachable_ids(path)
        assert unreachable_ids(path, Encoder(path, "gigatoken")) == alone
        assert unreachable_ids(path, Encoder(path, "fastokens")) == alone
        assert unreachable_ids(path, Garbled()) == alone


def test_renyi_efficiency_by_hand_and_words_by_their_definition():
    # ids used 2, 1, 1 times of a 4-id vocabulary: p = 1/2, 1/4, 1/4; sum p^2.5 = 2^-2.5 + 2 x 4^-2.5 = 0.23928;
    # H_2.5 = ln(0.23928) / (1 - 2.5) = 0.95342; over ln 4: 0.68775
    assert renyi_efficiency(np.array([2, 1, 1, 0]), 4) == pytest.approx(0.6877494, abs=1e-7)
    assert renyi_efficiency(np.array([5, 5, 5, 5]), 4) == pytest.approx(1.0)  # every id equally: efficiency 1
    assert words_in(b"  one two\tthree\n\nfour ") == 4 and words_in(b"") == 0 and words_in(b"x") == 1


def test_compare_measures_each_tokenizer_as_an_independent_count_does(tmp_path, run, sample_docs):
    docs = sample_docs["Github.jsonl.zst"][:10] + sample_docs["Fortunes.jsonl.zst"][:10]
    write_jsonl(tmp_path / "c.jsonl", docs)
    result = run.ok(
        "compare-tokenizers", tmp_path / "c.jsonl", "--tokenizer", "gpt-neox-20b", "--output", tmp_path / "r"
    )
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    for name, path in (("gpt2", GPT2), ("gpt-neox-20b", NEOX)):
        tok = Tokenizer.from_file(str(path))
        size = tok.get_vocab_size(with_added_tokens=True)
        m = report["metrics"][name]
        for component, measured in [*m["components"].items(), ("total", m)]:
            texts = [d["text"] for d in docs if component in ("total", d["meta"]["pile_set_name"])]
            ids = np.array([i for t in texts for i in tok.encode(t, add_special_tokens=False).ids])
            p = np.bincount(ids, minlength=size) / len(ids)
            p = p[p > 0]
            words = sum(len(t.encode().split()) for t in texts)  # bytes.split(): ASCII whitespace only
            assert measured["renyi_efficiency"] == pytest.approx(np.log(np.sum(p**2.5)) / -1.5 / np.log(size))
            assert measured["tokens_per_word"] == pytest.approx(len(ids) / words)
            assert measured["bytes_per_token"] == pytest.approx(sum(len(t.encode()) for t in texts) / len(ids))
            assert measured["vocabulary_used"] == pytest.approx(len(p) / size)
        assert len(m["unreachable_ids"]) == (221 if name == "gpt-neox-20b" else 0)
    assert "221 unreachable" in result.output and "Rényi" in result.output
    for figure in ("bytes_per_token", "tokens_per_word", "renyi_efficiency", "vocabulary_used"):
        assert (tmp_path / "r" / f"{figure}.png").stat().st_size > 0
    assert "| gpt-neox-20b | 50,277 |" in (tmp_path / "r" / "report.md").read_text()
    assert "renyi_efficiency" in (tmp_path / "r" / "report.csv").read_text().splitlines()[0]


def test_a_trained_tokenizer_with_an_unreachable_id_fails_loudly(tmp_path, run, sample_docs, monkeypatch):
    """Were the training ever to make an id that encoding cannot produce (the released file's 221 came from
    merges its added tokens pre-empt), train-tokenizer says so and exits 1, the report listing them."""
    import tokenizer.train

    monkeypatch.setattr(tokenizer.train, "unreachable_ids", lambda path: [300, 301])
    write_jsonl(tmp_path / "in.jsonl", sample_docs["Fortunes.jsonl.zst"][:40])
    result = run("train-tokenizer", tmp_path / "in.jsonl", "--output", tmp_path / "t", "--vocab-size", 600)
    assert result.exit_code == 1 and "2 id(s) that encoding never produces" in result.output
    assert json.loads((tmp_path / "t" / "train_report.json").read_text())["held_out"]["unreachable_ids"] == [300, 301]


def test_the_held_out_documents_are_those_build_shards_keeps_out_of_train(tmp_path, run, sample_docs):
    """Same --split, same documents: what train-tokenizer measures on is build-shards' valid and test."""
    docs = sample_docs["Fortunes.jsonl.zst"][:120]
    write_jsonl(tmp_path / "in.jsonl", docs)
    build = ("build-shards", tmp_path / "in.jsonl", "--tokenizer", "gpt-neox-20b", "--output", tmp_path / "s")
    run.ok(*build, "--split", "5,3,2", "--workers", 1)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    splits = manifest["components"]["Fortunes"]["splits"]
    run.ok("train-tokenizer", tmp_path / "in.jsonl", "--output", tmp_path / "t", "--vocab-size", 600, "--split=5,3,2")
    report = json.loads((tmp_path / "t" / "train_report.json").read_text())
    held = splits["valid"]["documents"] + splits["test"]["documents"]
    assert 0 < held < len(docs) and report["held_out"]["documents"] == report["held_out"]["measured_documents"] == held
    assert report["components"]["Fortunes"]["documents"] == splits["train"]["documents"] == len(docs) - held
