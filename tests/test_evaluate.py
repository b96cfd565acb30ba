"""neox-data evaluate: the local tasks through lm-eval, on a tiny model before and after brief training."""

import json

import pytest
import torch
from helpers import NEOX, SAMPLE, assert_clean_error, read_jsonl_zst
from tokenizers import Tokenizer

from trainer.checkpoint import save_checkpoint
from trainer.config import load_config
from trainer.evaluate import LOCAL_TASKS, TASKS, last_word_items, passages, task_manager
from trainer.model import GPTNeoX


def test_local_tasks_hold_text_that_is_not_in_the_training_sample():
    sample = "".join(d["text"] for p in SAMPLE.glob("*.jsonl.zst") for d in read_jsonl_zst(p))
    rows = [json.loads(line) for f in TASKS.glob("*.jsonl") for line in f.read_text().splitlines()]
    assert len(rows) > 200 and {r["split"] for r in rows} == {"validation", "test"}
    for r in rows[::10]:
        assert (r.get("text") or r["context"])[:200] not in sample


def test_passages_and_last_words_are_cut_at_boundaries():
    text = "One two three four. Five six seven eight!\n\nNine ten eleven twelve thirteen.\n\nEnd of it all."
    assert passages(text, size=20) == ["One two three four. Five six seven eight!", "Nine ten eleven twelve thirteen."]
    items = last_word_items(text, context_words=3)
    assert items[0] == {"context": "One two three", "target": "four"}
    assert all(i["target"].isalpha() for i in items)


@pytest.mark.slow
def test_a_briefly_trained_model_has_lower_word_perplexity(tmp_path, run):
    config = load_config("configs/tiny.yml", ["num_layers=1", "hidden_size=64"])
    torch.manual_seed(0)
    model = GPTNeoX(config.model)
    save_checkpoint(model, config, tmp_path / "init", tokenizer=NEOX)
    genesis = read_jsonl_zst(SAMPLE / "Gutenberg_PG_19.jsonl.zst")[0]["text"]  # English prose, not the held-out book
    ids = torch.tensor(Tokenizer.from_file(str(NEOX)).encode(genesis[:200_000]).ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        batch = torch.stack([ids[i : i + 65] for i in torch.randint(0, len(ids) - 65, (16,)).tolist()])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    save_checkpoint(model, config, tmp_path / "trained", tokenizer=NEOX)
    scores = {}
    for name in ("init", "trained"):
        out = tmp_path / f"{name}.json"
        result = run.ok("evaluate", tmp_path / name, "--limit", 6, "--output", out)
        assert "neox_books_wordperplexity" in result.output and "neox_books_lastword" in result.output
        scores[name] = json.loads(out.read_text())["summary"]["neox_books_wordperplexity"]["word_perplexity"]
    assert scores["trained"] < scores["init"] / 10, scores


def test_unknown_task_is_a_clear_error_and_the_harness_tasks_are_known(tmp_path, run, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no probe of the Hub, and the variable is restored afterwards
    config = load_config("configs/tiny.yml", ["num_layers=1", "hidden_size=64"])
    save_checkpoint(GPTNeoX(config.model), config, tmp_path / "m", tokenizer=NEOX)
    result = run("evaluate", tmp_path / "m", "--tasks", "lambada_openai,no_such_task")
    assert result.exit_code == 1
    assert_clean_error(result.output, "unknown task(s): no_such_task (local ones:")


def test_local_tasks_alone_leave_the_harness_tasks_unindexed():
    """Indexing the harness's ~14,000 task files takes seconds: only a task that is not local needs them."""
    manager = task_manager(list(LOCAL_TASKS))
    assert manager.match_tasks(list(LOCAL_TASKS)) and not manager.match_tasks(["lambada_openai"])
