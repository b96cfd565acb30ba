"""configs/slurm/ under a real one-node Slurm (tests/slurm.py): the array job and its merge give one process's
bytes, a rank cancelled mid-way and requeued included; the train job reaches train_iters through its time limits
by requeueing itself, and every stop (scancel's USR1 and SIGTERM, a SIGKILL, a lost rank) resumes to the weights
and losses of an uninterrupted run, bitwise; two torchrun agents meet as two nodes. The runs are made beside the
other tests (tests/slurm_runs.py, started by conftest.py's `background`); these tests check what they gave."""

import re
from pathlib import Path

import pytest
import torch
from background import result
from helpers import NEOX, assert_same_build, losses, neox

from trainer.reshard import load_state_dict

pytestmark = pytest.mark.slurm
END = "global_step100"


class Runs:
    """The runs' results (tests/slurm_runs.py), as the session's background work wrote them."""

    def __init__(self, directory: Path):
        self.directory = directory

    def __getitem__(self, name: str) -> dict:
        return result(self.directory, f"slurm-{name}")


@pytest.fixture(scope="module")
def runs(background) -> Runs:
    why = result(background, "slurm-skip", timeout=300)
    if why:
        pytest.skip(why)
    return Runs(background)


@pytest.fixture(scope="module")
def reference(runs) -> dict:
    done = runs["reference"]
    assert done["job"]["JobState"] == "COMPLETED", done["out"][-3000:]
    assert [s for s, _ in losses(Path(done["run"]))] == list(range(1, 101))
    return done


def assert_ends_as(done: dict, reference: dict) -> None:
    """A run's job completed, with the reference's losses at every step and its final weights, bitwise; its
    latest checkpoint verifies."""
    assert done["job"]["JobState"] == "COMPLETED", done["out"][-3000:]
    run, ref = Path(done["run"]), Path(reference["run"])
    assert losses(run) == losses(ref)
    ours, theirs = load_state_dict(run / END), load_state_dict(ref / END)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert done["latest"] == END and neox("verify", run).returncode == 0
    assert "Traceback" not in done["out"], done["out"][-3000:]


def test_the_train_job_requeues_itself_at_its_time_limit_until_the_run_is_done(runs, reference):
    """--time=1: each allocation is warned (USR1) when Slurm next checks its limit, every rank saves its step and
    exits 75, the job requeues itself, and the next allocation goes on; at least two requeues, then the
    uninterrupted run's losses and weights. Requeued once more, the finished run ends at once."""
    done = runs["time-limit"]
    assert int(done["job"]["Restarts"]) >= 2, done["out"][-3000:]
    stops = sorted({int(s) for s in re.findall(r"stopped by SIGUSR1 after step (\d+)", done["out"])})
    assert len(stops) >= 2 and stops[-1] < 100, stops
    assert done["out"].count("requeueing job") == int(done["job"]["Restarts"])
    assert_ends_as(done, reference)
    assert done["again"]["JobState"] == "COMPLETED", done["again_out"][-3000:]
    assert f"nothing to train: {Path(done['run']) / END} is at step 100 (train_iters 100)" in done["again_out"]


@pytest.mark.parametrize("name, signal", [("usr1", "SIGUSR1"), ("term", "SIGTERM")])
def test_scancel_has_every_rank_save_and_stop_and_a_requeue_resumes(runs, reference, name, signal):
    """scancel --signal=USR1 (the job requeues itself) or a plain scancel (SIGTERM; the job ends, cancelled, and
    is requeued by hand): both ranks finish their step, save it and stop; the resumed run ends bitwise as the
    uninterrupted one."""
    done = runs[name]
    step = int(re.search(rf"stopped by {signal} after step (\d+)", done["end"]["out"]).group(1))
    assert 3 <= step < 100
    assert done["end"]["out"].count(f"stopped by {signal} after step {step}") == 2  # each rank
    if done["stopped"] is not None:
        assert done["stopped"]["job"]["JobState"] == "CANCELLED"
        assert done["stopped"]["latest"] == f"global_step{step}" and done["stopped"]["verify"] == 0
    else:
        assert "requeueing job" in done["end"]["out"]
    assert_ends_as(done["end"], reference)


def test_a_sigkill_resumes_from_the_last_periodic_save(runs, reference):
    """scancel --signal=KILL: no time to save; the job fails, `latest` (a periodic save) verifies, and requeued
    the run goes on from it to the uninterrupted run's end."""
    done = runs["kill"]
    stopped = done["stopped"]
    assert stopped["job"]["JobState"] == "FAILED" and "requeueing" not in stopped["out"]
    assert re.fullmatch(r"global_step[1-9]0", stopped["latest"]) and stopped["verify"] == 0
    assert_ends_as(done["end"], reference)


def test_a_lost_rank_ends_the_job_in_seconds_with_one_line_naming_it(runs, reference):
    """SIGKILL to rank 1's process (a node failure): rank 0 finds out at its next collective and says which rank
    was lost, in one line, within seconds; the job ends as failed, and requeued it resumes to the uninterrupted
    run's end."""
    done = runs["lost-rank"]
    lost = done["lost"]
    assert lost["job"]["JobState"] == "FAILED" and lost["seconds"] < 60, lost["seconds"]
    lines = [line for line in lost["out"].splitlines() if "lost rank" in line]
    assert len(lines) == 1 and "lost rank 1 of 2" in lines[0], lost["out"][-3000:]
    assert "Traceback" not in lost["out"] and "resume from the last one with --load" in lines[0], lost["out"][-3000:]
    assert_ends_as(done["end"], reference)


def test_two_torchrun_agents_meeting_as_two_nodes_train_as_one_node(runs, reference):
    done = runs["two-nodes"]
    assert done["codes"] == [0, 0], done["out"][-3000:]
    assert losses(Path(done["run"])) == losses(Path(reference["run"]))


def test_the_array_job_and_its_merge_are_one_process_bytes_with_a_rank_cancelled_mid_way(runs, tmp_path):
    """4 ranks as a Slurm array, merged by the dependent job: one process's bytes. Rank 2 cancelled after its
    first part (its dependent merge then never starts, as Slurm has it), requeued: it takes over its stale lock,
    finishes, and a merge submitted again gives the same bytes."""
    done = runs["shards"]
    committed, total = done["mid_way"]
    assert 1 <= committed < total and done["cancelled"] == "CANCELLED"
    assert done["stuck_merge"]["JobState"] == "PENDING"  # never started: Slurm's DependencyNeverSatisfied
    assert done["merged"] == "COMPLETED", done["logs"][-3000:]
    assert "taking over the lock" in done["logs"] and "Traceback" not in done["logs"]
    local = tmp_path / "local"
    neox(
        "build-shards", done["input"], "--tokenizer", NEOX, "--output", local, "--split", "90,5,5", "--part-size", "64K"
    )
    assert_same_build(Path(done["out"]), local)
