"""Resuming in another layout keeps Adam's state: the universal copy of each checkpoint (trainer/universal.py,
torch.distributed.checkpoint) lets a run of any TP x PP x DP continue as if it had never changed."""

from pathlib import Path

import pytest
from helpers import HALF_WIDTH, launch, layout, losses, train

# 30 steps of 4 x 32 tokens, a checkpoint every 10, no evaluation on the way: the three legs of 10 steps.
THIRTY = [
    *HALF_WIDTH,
    *("--set", "seq_length=32", "--set", "train_micro_batch_size_per_gpu=4"),
    *("--set", "train_iters=30", "--set", "save_interval=10"),
    *("--set", "eval_interval=0", "--set", "log_interval=1", "--set", "warmup=0.1"),
]


def hopped(*runs: Path) -> dict[int, float]:
    """The losses of runs that continue each other, by step."""
    return {step: loss for run in runs for step, loss in losses(run)}


def worst(reference: dict[int, float], other: dict[int, float]) -> float:
    """The largest relative difference of two runs' losses over the same steps."""
    assert sorted(reference) == sorted(other)
    return max(abs(other[s] - reference[s]) / abs(reference[s]) for s in reference)


@pytest.fixture(scope="module")
def thirty(shards, tmp_path_factory) -> dict[int, float]:
    """30 steps uninterrupted, one process, fp32: the reference."""
    run = tmp_path_factory.mktemp("thirty") / "run"
    train("--data", shards, "--save", run, *THIRTY)
    return hopped(run)


@pytest.mark.slow
def test_one_to_tp2_pp2_dp2_and_back_equals_thirty_straight_steps(shards, thirty, tmp_path):
    """1 process for 10 steps, TP2 x PP2 x DP2 for 10, 1 process for 10: each step's loss within 1e-5 of the
    uninterrupted run's (fp32; the 8 processes differ from one by float reordering, ~1e-6 over 30 steps)."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train("--data", shards, "--save", a, *THIRTY, "--set", "exit_interval=10")
    eight = launch(
        8, "--data", shards, "--load", a, "--save", b, *THIRTY, "--set", "exit_interval=20", *layout(2, 2, 2)
    )
    back = train("--data", shards, "--load", b, "--save", c, *THIRTY)
    assert "saved with TP x PP x DP = 1 x 1 x 1: weights, Adam's moments" in eight.stdout
    assert "saved with TP x PP x DP = 2 x 2 x 2: weights, Adam's moments" in back.stdout
    assert "data order" not in eight.stderr + back.stderr  # the global batch and its samples stay the same
    assert "deprecated" not in eight.stderr  # DeepSpeed's call of all_gather_into_tensor: nothing a user can do
    assert sorted(p.name for p in (b / "global_step20" / "universal").iterdir())[:2] == [
        "embed_out",
        "gpt_neox.embed_in",
    ]
    assert worst(thirty, hopped(a, b, c)) <= 1e-5


@pytest.mark.slow
def test_zero1_partitions_hop_to_one_process_and_no_universal_copy_restarts_the_moments(shards, thirty, tmp_path):
    """ZeRO stage 1 on 2 ranks (Adam's state partitioned, read through DeepSpeed's accessors) -> one process
    equals the straight run; a checkpoint saved with universal_checkpoint: false resumes with a warning that the
    moments restart, and its next losses leave the straight run's (what the test above would see without it)."""
    zero1 = ["--set", "zero_optimization={stage: 1}"]
    a, b = tmp_path / "a", tmp_path / "b"
    launch(2, "--data", shards, "--save", a, *THIRTY, *zero1, "--set", "exit_interval=10", *layout(1, 1, 2))
    train("--data", shards, "--load", a, "--save", b, *THIRTY, *zero1, "--set", "exit_interval=20")
    first20 = {s: v for s, v in thirty.items() if s <= 20}
    assert worst(first20, hopped(a, b)) <= 1e-5

    c, d = tmp_path / "c", tmp_path / "d"
    train("--data", shards, "--save", c, *THIRTY, "--set", "exit_interval=10", "--set", "universal_checkpoint=false")
    assert not (c / "global_step10" / "universal").exists()
    restarted = launch(
        2, "--data", shards, "--load", c, "--save", d, *THIRTY, "--set", "exit_interval=20", *layout(1, 1, 2)
    )
    assert "has no universal copy" in restarted.stderr and "the optimizer's moments restart" in restarted.stderr
    assert worst(first20, hopped(c, d)) > 1e-3
