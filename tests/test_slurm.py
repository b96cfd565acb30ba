"""configs/slurm/ under a real one-node Slurm (tests/slurm.py): the array job and its merge give one process's
bytes, a rank cancelled mid-way and requeued included; the train job reaches train_iters through its time limits
by requeueing itself, and one run stopped in turn by scancel's USR1 and SIGTERM, a SIGKILL and a lost rank resumes
each time, to the weights and losses of an uninterrupted run, bitwise; two torchrun agents meet as two nodes. The
runs are made beside the other tests (tests/slurm_runs.py, started by conftest.py's `background`); these tests
check what they gave."""

import re
from pathlib import Path

import pytest
import torch
from background import result
from helpers import NEOX, assert_same_build, losses, neox

from pile_tools.rundir import step_of
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
    assert done["job"]["JobState"] == "COMPLETED", shown(done["out"])
    assert [s for s, _ in losses(Path(done["run"]))] == list(range(1, 101))
    return done


def shown(out: str) -> str:
    """A job's output for an assertion message: its last 3000 characters less the C++ stack frames torch prints
    with some warnings."""
    lines = [line for line in out.splitlines() if not re.match(r"(frame #\d+|Exception raised from|<omitting)", line)]
    return "\n".join(lines)[-3000:]


def assert_ends_as(done: dict, reference: dict) -> None:
    """A run's job completed, with the reference's losses at every step and its final weights, bitwise; its
    latest checkpoint verifies."""
    assert done["job"]["JobState"] == "COMPLETED", shown(done["out"])
    run, ref = Path(done["run"]), Path(reference["run"])
    assert losses(run) == losses(ref)
    ours, theirs = load_state_dict(run / END), load_state_dict(ref / END)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert done["latest"] == END and neox("verify", run).returncode == 0
    assert "Traceback" not in done["out"], shown(done["out"])


def test_the_train_job_requeues_itself_at_its_time_limit_until_the_run_is_done(runs, reference):
    """--time=1: each allocation is warned (USR1) 5 s before its limit (by Slurm, up to a check, 30 s, earlier);
    every rank saves its step and exits 75, the job requeues itself, and the next allocation goes on; at least two
    requeues, then the uninterrupted run's losses and weights (a warning in the last step ends the run as planned:
    test_faults.py). Requeued once more, the finished run ends at once."""
    done = runs["time-limit"]
    assert int(done["job"]["Restarts"]) >= 2, shown(done["out"])
    stops = sorted({int(s) for s in re.findall(r"stopped by SIGUSR1 after step (\d+)", done["out"])})
    assert len(stops) >= 2 and stops[-1] < 100, stops
    assert done["out"].count("requeueing job") == int(done["job"]["Restarts"])
    assert_ends_as(done, reference)
    assert done["again"]["JobState"] == "COMPLETED", shown(done["again_out"])
    assert f"nothing to train: {Path(done['run']) / END} is at step 100 (train_iters 100)" in done["again_out"]


@pytest.fixture(scope="module")
def stops(runs) -> dict:
    """One run stopped four ways in turn (tests/slurm_runs.py's `stops`): what each stop left, and the end."""
    return runs["stops"]


def stop_step(out: str, signal: str) -> int:
    """The step both ranks say they stopped after, on `signal`."""
    steps = re.findall(rf"stopped by {signal} after step (\d+)", out)
    assert len(steps) == 2 and steps[0] == steps[1], shown(out)  # each rank, the same step
    return int(steps[0])


def test_scancel_usr1_has_every_rank_save_and_stop_and_the_job_requeue_itself(stops):
    usr1 = stops["usr1"]
    assert 3 <= stop_step(usr1["out"], "SIGUSR1") == step_of(usr1["latest"])
    assert "requeueing job" in usr1["out"] and usr1["verify"] == 0


def test_a_plain_scancel_has_every_rank_save_and_stop_and_the_job_end(stops):
    """SIGTERM: the step is saved, the job ends cancelled (and is requeued by hand)."""
    term = stops["term"]
    step = stop_step(term["out"], "SIGTERM")
    assert step > step_of(stops["usr1"]["latest"])
    assert term["job"]["JobState"] == "CANCELLED" and "requeueing" not in term["out"], shown(term["out"])
    assert term["latest"] == f"global_step{step}" and term["verify"] == 0


def test_a_sigkill_leaves_the_last_periodic_save_latest(stops):
    """No time to save: the job fails, and `latest` is a periodic save after the last stop's, which verifies."""
    kill = stops["kill"]
    assert kill["job"]["JobState"] == "FAILED" and "requeueing" not in kill["out"], shown(kill["out"])
    saved = step_of(kill["latest"])
    assert saved % 10 == 0 and saved > step_of(stops["term"]["latest"])
    assert kill["verify"] == 0


def test_a_lost_rank_ends_the_job_in_seconds_with_one_line_naming_it(stops):
    """SIGKILL to rank 1's process (a node failure): rank 0 finds out at its next collective and says which rank
    was lost, in one line, within seconds; the job ends as failed."""
    lost = stops["lost"]
    assert lost["job"]["JobState"] == "FAILED" and lost["seconds"] < 60, lost["seconds"]
    lines = [line for line in lost["out"].splitlines() if "lost rank" in line]
    assert len(lines) == 1 and "lost rank 1 of 2" in lines[0], shown(lost["out"])
    assert "Traceback" not in lost["out"] and "resume from the last one with --load" in lines[0], shown(lost["out"])
    assert lost["verify"] == 0


def test_the_run_stopped_four_ways_ends_as_the_uninterrupted_one(stops, reference):
    """Requeued after each stop, the run resumes from what it left, to the uninterrupted run's losses at every
    step and its final weights, bitwise."""
    assert_ends_as(stops["end"], reference)


def test_two_torchrun_agents_meeting_as_two_nodes_train_as_one_node(runs, reference):
    done = runs["two-nodes"]
    assert done["codes"] == [0, 0], shown(done["out"])
    assert losses(Path(done["run"])) == losses(Path(reference["run"]))


def test_the_array_job_and_its_merge_are_one_process_bytes_with_a_rank_cancelled_mid_way(runs, tmp_path):
    """4 ranks as a Slurm array, merged by the dependent job: one process's bytes. Rank 2 cancelled after its
    first part (its dependent merge then never starts, as Slurm has it): it finishes the parts under way and says
    how many are committed; requeued, it finishes, and a merge submitted again gives the same bytes."""
    done = runs["shards"]
    committed, total = done["mid_way"]
    assert 1 <= committed < total and done["cancelled"] == "CANCELLED"
    assert done["stuck_merge"]["JobState"] == "PENDING"  # never started: Slurm's DependencyNeverSatisfied
    assert done["merged"] == "COMPLETED", done["logs"][-3000:]
    assert f"{done['out']} (rank 2): stopped by SIGTERM with " in done["stopped_log"], done["stopped_log"][-3000:]
    assert "Traceback" not in done["logs"] + done["stopped_log"]
    local = tmp_path / "local"
    neox(
        "build-shards", done["input"], "--tokenizer", NEOX, "--output", local, "--split", "90,5,5", "--part-size", "64K"
    )
    assert_same_build(Path(done["out"]), local)
