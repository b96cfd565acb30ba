"""neox-data evaluate: the EleutherAI LM Evaluation Harness (`lm-eval`, the harness the paper used) on a model.

Takes an exported Hugging Face directory, or any checkpoint (a training run's directory too), which is exported
to a temporary directory first. Besides the harness's own tasks (LAMBADA, PIQA, HellaSwag, ...; they download
their datasets from the Hugging Face hub) two local tasks ship with the package, built from a book held out of the
bundled training sample (Jane Austen's Persuasion, public domain; trainer/eval_tasks/README.md):
    neox_books_wordperplexity   rolling log-likelihood of passages: word and byte perplexity, bits per byte
    neox_books_lastword         LAMBADA-style: the last word of a passage, accuracy and perplexity
"""

import json
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path

from pile_tools.ground import InputError, check_writable, write_json
from pile_tools.reader import hub_offline, hub_unreachable

TASKS = Path(__file__).parent / "eval_tasks"
LOCAL_TASKS = ("neox_books_wordperplexity", "neox_books_lastword")


def passages(text: str, size: int = 3000) -> list[str]:
    """Consecutive runs of whole paragraphs of about `size` characters."""
    out, current = [], ""
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        if paragraph:
            current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) >= size:
            out.append(current)
            current = ""
    return out


def last_word_items(text: str, context_words: int = 60) -> list[dict]:
    """LAMBADA-style items: ~`context_words` words of context, then a sentence's last word (3+ letters)."""
    words = text.split()
    items, start = [], 0
    for i in range(context_words, len(words)):
        word = words[i]
        bare = word.rstrip(".!?;:,\"'’”)")
        if i - start >= context_words and word[-1:] in ".!?" and bare.isalpha() and len(bare) >= 3:
            items.append({"context": " ".join(words[start:i]), "target": bare})
            start = i + 1
    return items


def build_local_data(book: str, out: Path = TASKS) -> None:
    """Write the two tasks' jsonl files from a book's text: the first half gives passages, the second last words.

    Each file's first fifth is the validation split (few-shot examples), the rest the test split."""
    half = book.find("\n\n", len(book) // 2)  # at a paragraph break
    for name, rows in (
        ("persuasion_passages.jsonl", [{"text": t} for t in passages(book[:half])]),
        ("persuasion_last_words.jsonl", last_word_items(book[half:])),
    ):
        cut = len(rows) // 5
        lines = [json.dumps({**r, "split": "validation" if i < cut else "test"}) for i, r in enumerate(rows)]
        (out / name).write_text("\n".join(lines) + "\n")


def hf_directory(model: Path, scratch: Path) -> Path:
    """An HF directory as it is, or a checkpoint exported into `scratch`."""
    if (model / "config.json").is_file():
        return model
    from trainer.hf import export_hf

    return export_hf(model, scratch / "hf")


def task_manager(tasks: list[str]):
    """The harness's task manager with our local tasks, once every task is known; without the Hub, the remote
    tasks are limited to cached data (set before `datasets` is imported: it reads the switches once). The
    harness's own ~14,000 task files are indexed only when a task is not local: reading them takes ~6 s."""
    remote = [t for t in tasks if t not in LOCAL_TASKS]
    if remote and not hub_offline() and (reason := hub_unreachable()):
        os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # cached data still works, a miss fails
        warnings.warn(
            f"the Hugging Face Hub cannot be reached ({reason}): {', '.join(remote)} can run only "
            "from data already cached",
            stacklevel=3,
        )
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS), include_defaults=bool(remote))
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise InputError(f"unknown task(s): {', '.join(unknown)} (local ones: {', '.join(LOCAL_TASKS)})")
    return manager


def evaluate(
    model: str | Path,
    tasks: list[str],
    num_fewshot: int | None = None,
    output: str | Path | None = None,
    limit: float | None = None,
    batch_size: int = 8,
    device: str | None = None,
) -> dict:
    """Run the harness; returns {task: {metric: value}} and writes the harness's results JSON to `output`."""
    model = Path(model)
    if not model.exists():
        raise InputError(f"{model}: no such model directory")
    import lm_eval
    import torch

    manager = task_manager(tasks)
    if output is not None:
        check_writable(Path(output).absolute().parent)  # before the harness runs, not after
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # per-request notices (e.g. each context cut to the model's length) drown the results on short-context models
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as scratch:
        hf = hf_directory(model, Path(scratch))
        try:
            results = lm_eval.simple_evaluate(
                model="hf",
                model_args={"pretrained": str(hf), "dtype": "float32" if device == "cpu" else "bfloat16"},
                tasks=tasks,
                num_fewshot=num_fewshot,
                batch_size=batch_size,
                device=device,
                limit=limit,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=0,
                verbosity="ERROR",
            )
        except ConnectionError as e:
            raise InputError(
                f"{e}: the harness's tasks download their data from the Hugging Face Hub; "
                f"the local ones ({', '.join(LOCAL_TASKS)}) need no network"
            ) from None
    summary = {
        task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"}
        for task, metrics in results["results"].items()
    }
    if output is not None:
        keep = {"results": results["results"], **{k: results.get(k, {}) for k in ("configs", "versions")}}
        write_json(Path(output), {"model": str(model), "num_fewshot": num_fewshot, "summary": summary, **keep})
    return summary
