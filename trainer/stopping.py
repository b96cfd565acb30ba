"""How a run stops before train_iters. On request: SIGTERM or SIGUSR1 (Slurm's preemption and time limit, its
`--signal` warning, `scancel`), recorded from the moment `train` starts, so one that comes while torch loads or the
model is built is not lost; every rank finishes its step, saves it and exits with STOPPED. When a rank is lost (its
process or node died): the others find out at their next collective and say which rank it was."""

import contextlib
import os
import re
import signal
import socket
import time

from trainer.config_keys import RunError

# sysexits' EX_TEMPFAIL, "try again later": stopped on request with the step saved. A Slurm job requeues itself on
# it (configs/slurm/train.sbatch); any other failure ends the job as failed.
STOPPED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
CENSUS_S = 5.0  # how long the ranks still alive take to answer, counted from the first to find the loss


class Stopped(RunError):
    """Stopped on request after saving the step: exit status STOPPED."""

    exit_code = STOPPED


class PeerLost(RunError):
    """Another rank was lost; the message (None on the ranks that leave the saying to rank 0) names it."""


class StopRequests:
    """The first stop signal received, by name (None: none yet)."""

    def __init__(self):
        self.received: str | None = None

    def record(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    @contextlib.contextmanager
    def listening(self):
        """Record SIGTERM and SIGUSR1 inside the block, then give them back the handlers they had (a notebook or a
        sweep goes on in the same process)."""
        previous = {signum: signal.signal(signum, self.record) for signum in SIGNALS}
        try:
            yield self
        finally:
            for signum, before in previous.items():
                signal.signal(signum, before)


def lost_peer(error: BaseException) -> bool:
    """Whether a collective failed because another rank's process or node went away (gloo: the connection closed;
    NCCL: the watchdog's error or timeout), not for a reason of this rank's own."""
    import torch.distributed as dist

    text = str(error)
    signs = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL", "Timed out", "timed out")
    return isinstance(error, dist.DistError) or any(sign in text for sign in signs)


def lost_ranks_line(error: BaseException) -> str | None:
    """The line a run ends with when a peer is lost, said once: rank 0 names the ranks that did not answer a census
    in the run's rendezvous store (its own process holds it, or torchrun's agent) within CENSUS_S; the other ranks
    answer and say nothing, unless the store is gone: then rank 0 was the one lost."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    cause = short_cause(error)
    where = f"{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        if not store_answers():
            raise ConnectionError(where)  # asked through the store, it would log a C++ stack at every retry
        store = dist.distributed_c10d._get_default_store()
        store.set(f"neox-census/{rank}", "alive")
        answered = store.add("neox-census", 1)
        if rank != 0:
            return None
        deadline = time.monotonic() + CENSUS_S
        while answered < world and time.monotonic() < deadline:
            time.sleep(0.25)
            answered = store.add("neox-census", 0)
        lost = [r for r in range(world) if not store.check([f"neox-census/{r}"])]
    except Exception:  # the store went with its process
        return (
            f"rank {rank}: rank 0 was lost (the run's rendezvous store it held at {where} does not answer; {cause}); "
            "stopping without a checkpoint: resume from the last one with --load"
        )
    if not lost:
        return f"a collective failed with every rank alive: {cause}"
    names = ", ".join(map(str, lost))
    return (
        f"lost rank{'s' if len(lost) > 1 else ''} {names} of {world}: no answer in {CENSUS_S:.0f} s, its process or "
        f"node died ({cause}); stopping without a checkpoint: resume from the last one with --load"
    )


def short_cause(error: BaseException) -> str:
    """The error's first sentence, without the source location gloo puts before it ("[.../pair.cc:553] ")."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip())
    return text.split(". ")[0].splitlines()[0][:160] if text else type(error).__name__


def store_answers() -> bool:
    """Whether something still listens where the rendezvous store was (MASTER_ADDR:MASTER_PORT)."""
    try:
        address = (os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "")))
        with socket.create_connection(address, timeout=2):
            return True
    except (OSError, ValueError):
        return False
