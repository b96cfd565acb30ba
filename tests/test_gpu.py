"""On a CUDA device (skipped without one; run them with `pytest -m gpu` on a GPU machine): mixed precision trains,
resumes exactly, and the chunked loss equals the plain one there."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import SMALL, losses, train

from trainer.model import lm_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
STEPS = ["--set", "train_iters=30", "--set", "save_interval=10", "--set", "eval_interval=0", "--set", "lr=0.003"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_30_steps_and_the_loss_falls(shards, tmp_path, precision):
    train("--data", shards, "--save", tmp_path / "run", *SMALL, *STEPS, "--set", f"{precision}=true")
    got = [loss for _, loss in losses(tmp_path / "run")]
    assert len(got) == 30 and all(x == x for x in got)
    assert sum(got[-5:]) / 5 < sum(got[:5]) / 5 - 0.5
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert all(r["peak_memory_gib"] > 0 and r["data_wait_s"] >= 0 for r in train_rows)


def test_a_bf16_run_resumed_equals_one_uninterrupted(shards, tmp_path):
    bf16 = ["--set", "bf16=true", "--set", "compile=false"]  # compile's kernels may differ between processes
    train("--data", shards, "--save", tmp_path / "straight", *SMALL, *STEPS, *bf16)
    train("--data", shards, "--save", tmp_path / "resumed", *SMALL, *STEPS, *bf16, "--set", "exit_interval=10")
    train("--data", shards, "--save", tmp_path / "resumed", "--load", tmp_path / "resumed", *SMALL, *STEPS, *bf16)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def test_the_chunked_loss_equals_the_plain_one_on_cuda():
    torch.manual_seed(0)
    logits = torch.randn(8, 2048, 50_432, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 50_000, (8, 2048), device="cuda")
    plain = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    (want,) = torch.autograd.grad(plain, logits)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = lm_loss(logits, targets)
    (got,) = torch.autograd.grad(loss, logits)
    peak = torch.cuda.max_memory_allocated() - base
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=0)
    torch.testing.assert_close(got, want)
    assert peak < logits.numel() * 4  # never the fp32 copy of all the logits (3.3 GB here)
