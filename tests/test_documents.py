"""Documents that do not see each other: with reset_attention_mask, reset_position_ids and eod_mask_loss, a
packed sample trains as its documents would alone; every layout agrees; all off changes nothing."""

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    HALF_WIDTH,
    ROOT,
    SAMPLE,
    Cli,
    assert_same_losses,
    launch,
    layout,
    losses,
    read_jsonl_zst,
    train,
    unconstant,
    write_jsonl,
)

from trainer.config import DataConfig, NeoXConfig, TrainingConfig
from trainer.model import IGNORED, GPTNeoX, ModelConfig, document_layout, lm_loss
from trainer.samples import Packing, document_starts

EOD = 0
PACKED = ["--set", "eod_mask_loss=true", "--set", "reset_attention_mask=true", "--set", "reset_position_ids=true"]


def packed_batch(vocab: int) -> torch.Tensor:
    """Two samples of 33 ids packing documents of several lengths, each closed by EOD: the first sample starts in
    the middle of a document and ends in the middle of another; the second holds one EOD right at its start."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, vocab, (2, 33), generator=g)
    for b, ends in ((0, [4, 13, 16, 24]), (1, [0, 19])):
        ids[b, ends] = EOD
    return ids


def alone(model: GPTNeoX, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed loss, targets counted) of each document of each sample run on its own from position 0: its ids up
    to its EOD, predicting the next id of the same document (an EOD's target opens the next document: not counted,
    as eod_mask_loss leaves it out)."""
    total, count = 0.0, 0
    for sample in ids:
        inputs = sample[:-1]
        starts = [0, *(torch.nonzero(inputs == EOD).flatten() + 1).tolist()]
        for a, b in zip(starts, [*starts[1:], len(inputs)]):
            if a == b:
                continue
            x, y = sample[a:b].unsqueeze(0), sample[a + 1 : b + 1].clone().unsqueeze(0)
            y[x == EOD] = IGNORED
            total = total + lm_loss(model(x), y, reduction="none").sum()
            count += int((y != IGNORED).sum())
    return total, count


@pytest.mark.parametrize("parallel", [True, False])
def test_a_packed_sample_trains_as_its_documents_alone(parallel):
    """Loss and gradients of the packed batch with all three switches equal those of each document run alone
    (token-weighted), to fp32 rounding."""
    torch.manual_seed(0)
    config = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=300, gpt_j_residual=parallel)
    model = unconstant(GPTNeoX(config), seed=9)
    ids = packed_batch(model.config.vocab_size)
    inputs, targets = Packing(EOD, True, True, True).split(ids)
    packed = lm_loss(model(**inputs), targets, masked=True)
    packed.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total, count = alone(model, ids)
    (total / count).backward()
    assert count == int((targets != IGNORED).sum())
    torch.testing.assert_close(packed, total / count, rtol=1e-6, atol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_the_layout_of_documents_in_a_sample():
    ids = torch.tensor([[5, 6, EOD, 7, EOD, EOD, 8, 9]])
    positions, documents = document_layout(ids, EOD, True, True)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    assert documents.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    assert document_layout(ids, EOD, False, False) == (None, None)
    assert document_starts(torch.cat([ids[0], torch.tensor([4])]).numpy(), EOD) == [0, 3, 5, 6]


def test_eod_mask_loss_leaves_out_exactly_the_targets_of_eod_inputs():
    """gpt-neox's eod_mask_loss (get_ltor_masks_and_position_ids: loss_mask[tokens == eod] = 0): the loss is the
    mean over the other targets."""
    ids = packed_batch(300)
    inputs, targets = Packing(EOD, mask_loss=True).split(ids)
    eods = ids[:, :-1] == EOD
    assert (targets == IGNORED).tolist() == eods.tolist() and int(eods.sum()) == 6
    assert torch.equal(targets[~eods], ids[:, 1:][~eods]) and set(inputs) == {"ids", "positions", "documents"}
    logits = torch.randn(2, 32, 300)
    kept = lm_loss(logits, ids[:, 1:], reduction="none")[~eods].mean()
    torch.testing.assert_close(lm_loss(logits, targets, masked=True), kept, rtol=1e-6, atol=0)


def test_all_off_the_model_sees_what_it_saw_before():
    ids = packed_batch(300)
    inputs, targets = Packing.of(NeoXConfig(training=TrainingConfig(), data=DataConfig()), None).split(ids)
    assert set(inputs) == {"ids"} and torch.equal(inputs["ids"], ids[:, :-1]) and torch.equal(targets, ids[:, 1:])


def same_as_recorded(run: Path, tag: str, recorded: dict) -> None:
    """A run's losses and weights, bit for bit those recorded."""
    from trainer import data_only

    assert [[s, loss] for s, loss in losses(run)] == recorded["losses"]
    weights = data_only.load(run / tag / "mp_rank_00_model_states.pt")["module"]
    assert {k: float(v.double().sum()) for k, v in weights.items()} == recorded["weight_sums"]


def close_to_recorded(run: Path, tag: str, recorded: dict) -> None:
    """A run's losses within 1e-5 and weight sums within 2e-3 (relative) of those recorded on another kind of CPU
    (two kinds here: losses 3e-7 apart over the demo's 200 steps, sums of a weight 3e-4)."""
    from trainer import data_only

    got = losses(run)
    assert [s for s, _ in got] == [s for s, _ in recorded["losses"]]
    assert all(abs(a - b) <= 1e-5 * abs(b) for (_, a), (_, b) in zip(got, recorded["losses"])), got
    weights = data_only.load(run / tag / "mp_rank_00_model_states.pt")["module"]
    sums = {k: float(v.double().sum()) for k, v in weights.items()}
    assert sums.keys() == recorded["weight_sums"].keys()
    assert all(abs(sums[k] - v) <= 2e-3 * max(1.0, abs(v)) for k, v in recorded["weight_sums"].items())


def test_with_packing_off_the_runs_are_bitwise_what_they_were(straight, demo):
    """The straight run's 6 steps and the demo's 200 (packing off), against the losses and weights the code gave
    before packing existed (tests/fixtures/unpacked_run.json, made from commit fc703de by make_unpacked_run.py):
    bit for bit on a kind of CPU the fixture records (each rounds its float reductions its own way), else close."""
    import torch

    records = json.loads((ROOT / "tests" / "fixtures" / "unpacked_run.json").read_text())["records"]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "unknown")
    here = [r for r in records if (r["cpu"], r["capability"]) == (cpu, torch.backends.cpu.get_cpu_capability())]
    check = same_as_recorded if here else close_to_recorded
    for record in here[:1] or records:
        check(straight, "global_step6", record["straight"])
        check(demo[0] / "demo-output" / "run", "global_step200", record["demo"])


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory) -> Path:
    """Shards of real text cut into short documents (paragraphs), so that 32-token samples pack several."""
    root = tmp_path_factory.mktemp("short")
    paragraphs = [
        {"text": p.strip()}
        for d in read_jsonl_zst(SAMPLE / "Gutenberg_PG_19.jsonl.zst")[:2]
        for p in d["text"].split("\n\n")
        if 20 < len(p.strip()) < 400
    ]
    write_jsonl(root / "short.jsonl", paragraphs[:3000])
    out = root / "shards"
    Cli().ok("build-shards", root / "short.jsonl", "--tokenizer", "gpt-neox-20b", "--output", out, "--split", "1,0,0")
    return out


STEPS = [
    *HALF_WIDTH,
    *("--set", "seq_length=32", "--set", "train_iters=8"),
    *("--set", "save_interval=4", "--set", "eval_interval=0", "--set", "log_interval=1"),
]
# The global batch of 4 as micro-batches of 2: eod_mask_loss averages each micro-batch's counted targets (as
# gpt-neox), so a run equals another exactly when their micro-batches hold the same samples: 2 a step, or 2 data-
# parallel ranks of 1.
TWO_BY_TWO = ["--set", "train_micro_batch_size_per_gpu=2", "--set", "gradient_accumulation_steps=2"]


@pytest.mark.slow
def test_packed_documents_train_alike_in_every_layout_and_across_a_resume(short_docs, tmp_path):
    """One process with the three switches, against TP2, PP2, and TP2 x PP2 x DP2 resumed from the one process's
    step 4: the same losses (fp32 reordering: 1e-4 for the layouts, as unpacked; 1e-5 for the resume); packing
    changes the losses (the samples hold documents)."""
    one, plain = tmp_path / "one", tmp_path / "plain"
    train("--data", short_docs, "--save", one, *STEPS, *TWO_BY_TWO, *PACKED)
    train("--data", short_docs, "--save", plain, *STEPS, *TWO_BY_TWO)
    assert all(a != b for (_, a), (_, b) in zip(losses(one), losses(plain)))
    for name, (tp, pp) in {"tp2": (2, 1), "pp2": (1, 2)}.items():
        run = tmp_path / name
        launch(tp * pp, "--data", short_docs, "--save", run, *STEPS, *PACKED, *layout(tp, pp, 1), *TWO_BY_TWO)
        assert_same_losses(one, run, rtol=1e-4)  # as the unpacked layouts: float reordering, grad norms ~5e-5
    first, eight = tmp_path / "first", tmp_path / "eight"
    train("--data", short_docs, "--save", first, *STEPS, *TWO_BY_TWO, *PACKED, "--set", "exit_interval=4")
    launch(8, "--data", short_docs, "--load", first, "--save", eight, *STEPS, *PACKED, *layout(2, 2, 2))  # micro 2
    steps = dict(losses(one))
    assert [s for s, _ in losses(eight)] == [5, 6, 7, 8]
    assert all(abs(loss - steps[s]) <= 1e-5 * abs(steps[s]) for s, loss in losses(eight)), (losses(eight), steps)


def test_batch_shows_where_each_samples_documents_start(short_docs):
    args = ["batch", "--config", ROOT / "configs" / "tiny.yml", "--data", short_docs, "--step", 1, *STEPS, *PACKED]
    shown = json.loads(Cli().ok(*args, "--json").output)
    assert shown["documents_masked"] is True and len(shown["document_starts"]) == len(shown["tokens"])
    for sample, starts in zip(shown["tokens"], shown["document_starts"]):
        assert starts == [0] + [i + 1 for i, token in enumerate(sample[:-2]) if token == EOD]
    assert any(len(starts) > 1 for starts in shown["document_starts"])
    assert "masked from each other" in Cli().ok(*args).output
