"""A one-node Slurm for the cluster tests: munged, slurmctld and slurmd started by hand (no systemd), every file
under one directory, the configuration in SLURM_CONF, stopped by their pid files. Debian's packages are installed
first when missing (as root). `Slurm.start` returns None and the reason when it cannot start here."""

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
DAEMONS = ("slurmd", "slurmctld", "munged")  # stopped in this order
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
# slurmd, and so every job's processes, at nice -10: the runs keep their pace beside the other tests.
# One node at 127.0.0.1 advertising more CPUs than this machine has (config_overrides), so the jobs of a test and
# its steps all fit; no cgroups here; a requeued job starts again in seconds (short credentials, a scheduler pass
# every 2 s); SIGTERM (scancel, the time limit) is followed by SIGKILL after 15 s.
CONF = """\
ClusterName=neoxtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.socket,cred_expire=10
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
KillWait=15
MinJobAge=600
InactiveLimit=0
Waittime=0
NodeName={host} NodeAddr=127.0.0.1 CPUs=16 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def install() -> str | None:
    """Debian's Slurm and munge, when missing; the reason it cannot, or None."""
    if all(shutil.which(d) for d in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and this is not root on Debian (apt-get install slurmctld slurmd munge)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            return f"cannot install Slurm ({' '.join(cmd)}): {(result.stderr or result.stdout).strip()[-300:]}"
    return None


class Slurm:
    """A running one-node Slurm under `dir`; `env` holds SLURM_CONF for its commands."""

    def __init__(self, dir: Path):
        self.dir, self.stopped = dir, False
        self.host = socket.gethostname().split(".")[0]
        self.env = {**os.environ, "SLURM_CONF": str(dir / "slurm.conf")}

    @classmethod
    def start(cls, dir: Path) -> tuple["Slurm | None", str | None]:
        if os.geteuid() != 0:
            return None, "the one-node Slurm runs its daemons as root; this is not root"
        why = install()
        if why:
            return None, why
        slurm = cls(dir)
        why = slurm.up()
        if why:
            slurm.stop()
            return None, why
        return slurm, None

    def up(self) -> str | None:
        d = self.dir
        for sub in ("state", "spool"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)  # munged refuses a socket directory others may write
        ctld_port, d_port = free_ports(2)
        (d / "slurm.conf").write_text(CONF.format(host=self.host, dir=d, ctld_port=ctld_port, d_port=d_port))
        steps = [
            [
                "munged",
                "--force",
                f"--socket={d}/munge.socket",
                f"--pid-file={d}/munged.pid",
                f"--log-file={d}/munged.log",
                f"--seed-file={d}/munged.seed",
            ],
            ["slurmctld", "-i"],
            ["slurmd", "-N", self.host, "-n", "-10"],
        ]
        for cmd in steps:
            result = subprocess.run(cmd, capture_output=True, text=True, env=self.env)
            if result.returncode != 0:
                return f"{cmd[0]} did not start: {(result.stderr or result.stdout).strip()[-300:]}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return None
            time.sleep(0.5)
        return f"the node did not come up in 60 s (sinfo: {state!r}; logs in {d})"

    def run(self, *args, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        env = {**self.env, **(env or {})}
        result = subprocess.run(list(map(str, args)), capture_output=True, text=True, env=env)
        assert not check or result.returncode == 0, result.stdout + result.stderr
        return result

    def submit(self, *args, env: dict | None = None) -> str:
        """sbatch ARGS; the job's id."""
        return self.run("sbatch", "--parsable", *args, env=env).stdout.strip().split(";")[0]

    def jobs(self, job: str) -> list[dict]:
        """`scontrol show job` of a job (each task of an array), as dicts."""
        out = self.run("scontrol", "show", "job", "-o", job, check=False).stdout
        return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in out.splitlines() if line]

    def state(self, job: str) -> str:
        return " ".join(j["JobState"] for j in self.jobs(job))

    def check_running(self) -> bool:
        """True; an AssertionError once the cluster is stopped (a run still waiting then gives up)."""
        assert not self.stopped, "the one-node Slurm was stopped"
        return True

    def wait(self, job: str, timeout: float, states=ENDED) -> list[dict]:
        """Wait until every task of `job` is in one of `states` (by default: ended, not to be requeued)."""
        deadline = time.monotonic() + timeout
        while self.check_running():
            jobs = self.jobs(job)
            if jobs and all(j["JobState"] in states for j in jobs):
                return jobs
            assert time.monotonic() < deadline, f"job {job} not {states} in {timeout:.0f} s: {self.state(job)}"
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel every job (waiting up to 30 s for them to end), then stop the daemons by their pid files."""
        self.stopped = True
        jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if jobs:
            self.run("scancel", *jobs, check=False)
            deadline = time.monotonic() + 30
            while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for daemon in DAEMONS:
            pid_file = self.dir / f"{daemon}.pid"
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError, IndexError):
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
