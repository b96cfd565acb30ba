"""The runs tests/test_slurm.py checks, made under the one-node Slurm of tests/slurm.py with the job files of
configs/slurm/ as a user submits them. They are started with the test session (conftest.py's `background`) and go
on beside the other tests, each in a thread of its own, since most of their time is Slurm's (its time limits are
checked every 30 s, a requeued job starts again ~12 s later); each returns what its test checks."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from helpers import HALF_WIDTH, NEOX, ROOT, lock_holder, losses, neox, parts_of, planned_parts, wait_for
from slurm import Slurm

from pile_tools.rundir import step_of
from trainer.engine import free_port

JOBS = ROOT / "configs" / "slurm"
BIN = Path(sys.executable).parent
ITERS = 100
# The tiny model on 2 tasks as a pipeline of 2 stages, on CPU: every run below trains these 100 steps, saving every
# 10, and must give the reference run's losses and weights bitwise.
STEPS = [
    *HALF_WIDTH,
    *("--set", "seq_length=32", "--set", "train_micro_batch_size_per_gpu=4", "--set", "pipe_parallel_size=2"),
    *("--set", f"train_iters={ITERS}", "--set", "save_interval=10", "--set", "keep_last_n_checkpoints=2"),
    *("--set", "log_interval=1", "--set", "eval_interval=0"),
]
TASKS = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]  # the file asks for GPUs
# The time-limit run: Slurm checks limits every 30 s and sends a `--signal` warning at the first check within 30 s
# of its time (so "up to 60 seconds earlier than specified", sbatch(1)): USR1 5 s before the 1-minute limit comes at
# the first check 25 s or more into an allocation (25-55 s), long after its ranks started (a USR1 before a rank's
# handler is set would end it), and the limit itself (SIGTERM) a check later. Each step starts with a sleep of
# PACE_S (the ranks import PACED, the sitecustomize below; it changes nothing the steps compute): an allocation
# then trains at most ~42 steps, so 100 steps need at least two requeues, at about the same pace on an idle or a
# loaded machine, without burning the CPU the tests beside it need (a 20-batch evaluation after each step did).
PACE_S = 1.2
PACED = f"""
import importlib.abc, importlib.machinery, sys, time


class Paced(importlib.abc.MetaPathFinder):
    \"\"\"Once trainer.train is imported, each training step starts with a sleep of {PACE_S} s.\"\"\"

    def find_spec(self, name, path, target=None):
        if name != "trainer.train":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            step = module.Trainer.train_step
            module.Trainer.train_step = lambda self: time.sleep({PACE_S}) or step(self)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, Paced())
"""


def job_env(**more) -> dict:
    """The environment a job is submitted from (sbatch passes it on): this venv's neox-data, CPU and gloo."""
    path = f"{BIN}:{os.environ.get('PATH', '')}"
    return {"PATH": path, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONFAULTHANDLER": "1", **more}


class Runs:
    """The runs, each a function below started in `start`; `out(name)` is a run's job output."""

    def __init__(self, slurm: Slurm, shards: Path, work: Path):
        self.slurm, self.shards, self.work = slurm, shards, work

    def train_job(self, name: str, *sbatch_args: str, **env) -> tuple[str, Path]:
        """configs/slurm/train.sbatch for run `name` (its --save and --load: work/name; `env`: more of the job's
        environment); (job id, the run)."""
        run = self.work / name
        env = job_env(CONFIG=str(ROOT / "configs" / "tiny.yml"), DATA=str(self.shards), RUN=str(run), **env)
        job = self.slurm.submit(*TASKS, f"--output={run}.out", *sbatch_args, JOBS / "train.sbatch", *STEPS, env=env)
        return job, run

    def out(self, run: Path) -> str:
        return Path(f"{run}.out").read_text() if Path(f"{run}.out").is_file() else ""

    def result(self, job: str, run: Path, **more) -> dict:
        """What the tests check of a train run once its job ended."""
        job_info = self.slurm.jobs(job)[0]
        latest = (run / "latest").read_text() if (run / "latest").is_file() else None
        return {"job": job_info, "run": str(run), "out": self.out(run), "latest": latest, **more}

    def reference(self) -> dict:
        """The same 100 steps in one allocation, nothing stopping them."""
        job, run = self.train_job("reference", "--time=10")
        self.slurm.wait(job, 600)
        return self.result(job, run)

    def time_limit(self) -> dict:
        """The shipped job under a 1-minute limit, warned 5 s before it, its steps paced (PACED): it saves and
        requeues itself until the run is done; then requeued once more by hand, it ends at once."""
        paced = self.work / "paced"
        paced.mkdir(exist_ok=True)
        (paced / "sitecustomize.py").write_text(PACED)
        pythonpath = os.pathsep.join([str(paced), *filter(None, [os.environ.get("PYTHONPATH")])])
        job, run = self.train_job("time-limit", "--time=1", "--signal=USR1@5", PYTHONPATH=pythonpath)
        self.slurm.wait(job, 1200)
        ended = self.result(job, run)
        self.requeue(job)
        return {**ended, "again": self.slurm.wait(job, 300)[0], "again_out": self.out(run)[len(ended["out"]) :]}

    def requeue(self, job: str) -> None:
        """scontrol requeue JOB, once it has ended; returns when the job is back in the queue."""
        restarts = int(self.slurm.jobs(job)[0]["Restarts"])
        self.slurm.run("scontrol", "requeue", job)
        self.until(lambda: int(self.slurm.jobs(job)[0]["Restarts"]) > restarts, f"job {job} requeued", 60)

    def until(self, condition, what: str, timeout: float):
        """wait_for, given up at once when the cluster is stopped (the session ended before this run)."""
        return wait_for(lambda: self.slurm.check_running() and condition(), what, timeout)

    def stops(self) -> dict:
        """One run stopped from outside four times, each next allocation resuming from what the last left:
        1. `scancel --signal=USR1` once past step 3: every rank saves its step and stops, the job requeues itself;
        2. a plain `scancel` (SIGTERM) 3 steps into the next allocation: the same, and the job ends cancelled;
        3. SIGKILL to both ranks' processes once past a periodic save (no time to save: `scancel --signal=KILL`
           would send SIGTERM first): the job fails;
        4. SIGKILL to rank 1's process once past the next periodic save, as a node failure would end it;
        each ended job requeued by hand once what it left is recorded; then the run goes on to its end. What each
        stop left (its part of the job's output, the job, `latest` and whether it verifies), and the end."""
        job, run = self.train_job("stops", "--time=10")
        phases, seen = {}, 0

        def record(name: str, **more) -> None:
            nonlocal seen
            out = self.out(run)
            phases[name] = {**self.result(job, run, **more), "out": out[seen:]}
            phases[name]["verify"] = neox("verify", run, check=False).returncode
            seen = len(out)

        def past(step: int) -> None:
            self.until(lambda: max((s for s, _ in losses_of(run)), default=0) >= step, f"stops: step {step}", 600)

        def past_periodic_save(after: int) -> int:
            self.until(lambda: (periodic_save(run) or 0) > after, f"stops: a periodic save after step {after}", 600)
            saved = periodic_save(run)
            past(saved + 2)
            return saved

        past(3)
        self.slurm.run("scancel", "--signal=USR1", job)
        self.until(lambda: int(self.slurm.jobs(job)[0]["Restarts"]) > 0, f"job {job} requeued itself", 300)
        record("usr1")
        past(step_of_latest(run) + 3)
        self.slurm.run("scancel", job)
        self.slurm.wait(job, 120)
        record("term")
        self.requeue(job)
        saved = past_periodic_save(step_of_latest(run))
        ranks = [self.until(lambda r=r: rank_process(run, r), f"rank {r}'s process", 60) for r in (0, 1)]
        for process in ranks:
            process.kill()
        self.slurm.wait(job, 120)
        record("kill")
        self.requeue(job)
        past_periodic_save(saved)
        rank1 = self.until(lambda: rank_process(run, 1), "rank 1's process", 60)
        rank1.kill()
        killed = time.monotonic()
        self.slurm.wait(job, 300)
        record("lost", seconds=time.monotonic() - killed)
        self.requeue(job)
        self.slurm.wait(job, 600)
        return {**phases, "end": self.result(job, run)}

    def two_nodes(self) -> dict:
        """The run through two torchrun agents, each an srun of its own (a node), meeting by c10d rendezvous."""
        run = self.work / "two-nodes"
        port = free_port()
        agent = [BIN / "torchrun", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes"]  # fmt: skip
        train = [BIN / "neox-data", "train", "--config", ROOT / "configs" / "tiny.yml", "--data", self.shards]
        cmd = ["srun", "--nodes=1", "--ntasks=1", "--cpus-per-task=1", *agent, *train, "--save", run, *STEPS]
        env = {**self.slurm.env, **job_env()}
        nodes = [subprocess.Popen(list(map(str, cmd)), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for _ in range(2)]  # fmt: skip
        outs = [node.communicate(timeout=600)[0] for node in nodes]
        return {"run": str(run), "codes": [node.returncode for node in nodes], "out": "\n".join(outs)}

    def shards_array(self, many_parts: Path) -> dict:
        """The array job (4 ranks) and its merge; rank 2 frozen after its first part and cancelled, then requeued,
        and the merge submitted again once it succeeds (Slurm never starts one after a task of the array failed)."""
        out = self.work / "array-shards"
        env = job_env(INPUT=str(many_parts), OUTPUT=str(out), TOKENIZER=str(NEOX),
                      BUILD_OPTIONS="--split 90,5,5 --part-size 64K")  # fmt: skip
        logs, merge_log = f"--output={self.work}/%x-%A_%a.out", f"--output={self.work}/%x-%j.out"
        ranks = self.slurm.submit("--array=0-3", "--cpus-per-task=1", logs, JOBS / "build-shards.sbatch", env=env)
        merge = self.slurm.submit(f"--dependency=afterok:{ranks}", merge_log, JOBS / "merge-shards.sbatch", env=env)
        n_parts = self.until(lambda: planned_parts(out), "plan", 300)
        self.until(lambda: parts_of(out, 2, 4, n_parts)[0] >= 1, "rank 2's first part", 300)
        pid = lock_holder(out, 2)
        os.kill(pid, signal.SIGSTOP)  # mid-way for sure: scancel sends SIGCONT and SIGTERM together
        committed, total = parts_of(out, 2, 4, n_parts)
        self.slurm.run("scancel", f"{ranks}_2")
        cancelled = self.slurm.wait(f"{ranks}_2", 120)[0]["JobState"]
        stopped_log = (self.work / f"neox-shards-{ranks}_2.out").read_text()  # the requeued rank writes it anew
        self.slurm.wait(ranks, 300)
        merge_state = self.slurm.jobs(merge)[0]
        self.requeue(f"{ranks}_2")
        self.slurm.run("scancel", merge)
        merge = self.slurm.submit(f"--dependency=afterok:{ranks}_2", merge_log, JOBS / "merge-shards.sbatch", env=env)
        self.slurm.wait(merge, 300)
        merged = self.slurm.jobs(merge)[0]["JobState"]
        logs = "".join(p.read_text() for p in sorted(self.work.glob("neox-*.out")))
        return {"input": str(many_parts), "out": str(out), "mid_way": (committed, total), "cancelled": cancelled,
                "stopped_log": stopped_log, "stuck_merge": merge_state, "merged": merged, "logs": logs}  # fmt: skip


def losses_of(run: Path) -> list:
    try:
        return losses(run)
    except (OSError, ValueError, KeyError):
        return []


def step_of_latest(run: Path) -> int | None:
    return step_of((run / "latest").read_text().strip())


def periodic_save(run: Path) -> int | None:
    """The step `latest` names when it is a periodic save (every 10 steps), else None."""
    try:
        step = step_of_latest(run)
    except OSError:
        return None
    return step if step is not None and step % 10 == 0 else None


def rank_process(run: Path, rank: int) -> psutil.Process | None:
    """The training process of `rank` in the run saving to `run`."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(run) in (proc.info["cmdline"] or []) and proc.environ().get("RANK") == str(rank):
                return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None
