"""build-shards --executor ray: the ranks of `--rank I --world-size N`, each one Ray task, then merge-shards.

The ranks keep the contract Slurm arrays use (pile_tools/build.py): rank I encodes the parts i with i % N == I into
OUTPUT/.parts, and merge-shards joins them into the bytes one process writes, in the plan's order, never in the
order tasks finish. Ray only schedules: one task per rank, asking for --workers CPUs, run again by Ray's own
retries (max_retries) when its worker process or node dies; a rank whose parts are all committed is not submitted,
so a driver started again after a crash finishes the job without redoing them. OUTPUT must be storage every node
of the cluster sees (a shared filesystem), as for a Slurm array. With --world-size 1 the one task is the whole
single-machine build (it joins while it encodes), with nothing to merge.
"""

import contextlib
import os
import socket
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from pile_tools.ground import InputError
from pile_tools.options import BuildOptions

RETRIES = 3  # of a rank whose worker process or node died, by Ray
PATIENCE_S = 60.0  # for the ranks of a killed driver to be ended
INSTALL = "--executor ray needs Ray, which the core install leaves out: pip install 'neox-data[ray]'"


def import_ray():
    """The ray module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError(INSTALL) from None
    return ray


def absolute(spec: str) -> str:
    """An input or tokenizer that is a path here, made absolute (Ray's workers run elsewhere); others as given."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def build_rank(inputs: list[str], tokenizer: str, output: str, options: BuildOptions) -> list[str]:
    """One Ray task: build-shards for `options.rank` (or the whole build with world size 1); returns its lines and
    warnings for the driver to print (the driver shows the progress, over ranks)."""
    from pile_tools.build import build_shards

    os.environ["TQDM_DISABLE"] = "1"  # a bar in a worker's log helps no one
    try:  # Ray starts its workers at nice 15 (RAY_worker_niceness); a rank is the cluster's main work, not a
        os.setpriority(os.PRIO_PROCESS, 0, 0)  # background job: 20% of its time on 2 cores. Allowed to root only.
    except OSError:
        pass
    lines = []
    with warnings.catch_warnings(record=True) as caught, without_main_file():
        warnings.simplefilter("always")
        build_shards(inputs, tokenizer, output, options, echo=lines.append)
    return lines + [f"warning: {w.message}" for w in caught]


@contextlib.contextmanager
def without_main_file():
    """A Ray worker's __main__ is Ray's default_worker.py, which multiprocessing's spawn runs again in each child
    it starts (`__main__.__file__`): the rank's encoding workers would each import Ray before their work, 0.7 s a
    pool here. They need nothing of it (their work is pile_tools.build's), so it is not named while they start."""
    main = sys.modules["__main__"]
    path = main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        if path is not None:
            main.__file__ = path


def rank_done(out: Path, plan: dict, rank: int, world_size: int) -> bool:
    """Whether a rank has committed all its parts (and marked the directory as its, for merge-shards)."""
    from pile_tools.build import rank_parts
    from pile_tools.join import RANK_MARK

    parts = out / ".parts"
    marked = (parts / f"{RANK_MARK}{rank}-of-{world_size}").exists()
    return marked and all((parts / f"{i:05d}" / "receipt.json").is_file() for i in rank_parts(plan, rank, world_size))


def claim(out: Path, plan: dict, echo) -> bool:
    """claim_output while no rank of another build runs in `out`. The ranks of a driver that was killed are ended by
    Ray soon after: their locks are waited for, up to PATIENCE_S."""
    from pile_tools.build import claim_output
    from pile_tools.runlock import NAME as LOCK
    from pile_tools.runlock import Held, RunLock

    deadline = time.monotonic() + PATIENCE_S
    while True:
        try:
            with RunLock(out, excludes=(f"{LOCK}-rank*",)):
                return claim_output(out, plan)
        except Held as held:
            if time.monotonic() > deadline:
                raise
            if deadline - time.monotonic() > PATIENCE_S - 1:
                echo(f"waiting up to {PATIENCE_S:.0f} s for a run to leave {out}: {held}")
            time.sleep(1)


def failure(ray, error: Exception, rank: int) -> InputError:
    """One line for a rank that Ray gave up on: its own error, or its worker's death after the retries."""
    cause = getattr(error, "cause", None)
    if isinstance(error, ray.exceptions.RayTaskError) and cause is not None:
        return InputError(f"rank {rank}: {cause}")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return InputError(f"rank {rank}: lost after {RETRIES} retries ({type(error).__name__}: {first})")


def start(ray, address: str | None, workers: int) -> None:
    """Connect to the Ray cluster at `address` (default: a running local one, else a new one on this machine), and
    check it has the CPUs a rank asks for."""
    if address and address not in ("auto", "local") and "://" not in address:
        host, _, port = address.rpartition(":")
        try:  # Ray itself retries an address where nothing listens for minutes before it gives up
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=10).close()
        except (OSError, ValueError) as e:
            raise InputError(
                f"--ray-address {address}: no Ray cluster answers there ({e}); start one with `ray start --head`, or "
                "leave --ray-address out to use (or start) one on this machine"
            ) from None
    try:
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise InputError(f"--ray-address {address}: cannot connect to a Ray cluster there ({e})") from None
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < workers:
        ray.shutdown()
        raise InputError(
            f"a rank asks for --workers {workers} CPUs and the Ray cluster has {cpus:g}; give --workers {int(cpus)}"
        )


def ranks_to_run(out: Path, inputs, tokenizer, options: BuildOptions, echo) -> list[int] | None:
    """The ranks not done yet; None when `out` already holds the run's shards. With one rank, its task decides
    all that itself (it is the single-machine build)."""
    n = options.world_size
    if n == 1:
        return [0]
    from pile_tools.build import work_plan

    plan = work_plan(inputs, tokenizer, options)
    if claim(out, plan, echo):
        return None
    todo = [r for r in range(n) if not rank_done(out, plan, r, n)]
    if len(todo) < n:
        echo(f"{n - len(todo)} of {n} ranks already done in {out}; running the other {len(todo)} on Ray")
    return todo


def build_on_ray(inputs, tokenizer, output, options: BuildOptions, address: str | None, echo=print) -> Path:
    """Run the ranks of build-shards as Ray tasks, then merge them; returns the output directory."""
    ray = import_ray()
    inputs, tokenizer, out = [absolute(i) for i in inputs], absolute(tokenizer), Path(output).resolve()
    n = options.world_size
    if (todo := ranks_to_run(out, inputs, tokenizer, options, echo)) is None:
        echo(f"{out} already holds this run's shards (manifest.json); nothing to do")
        return out
    start(ray, address, options.workers)
    try:
        task = ray.remote(build_rank).options(num_cpus=options.workers, max_retries=RETRIES)
        running = {task.remote(inputs, tokenizer, str(out), replace(options, rank=r)): r for r in todo}
        with tqdm(total=n, initial=n - len(todo), desc="ranks on Ray", unit="rank", dynamic_ncols=True) as bar:
            while running:
                [ready], _ = ray.wait(list(running), num_returns=1)
                rank = running.pop(ready)
                try:
                    said = ray.get(ready)
                except Exception as e:  # a rank's own error, or its worker lost RETRIES + 1 times
                    raise failure(ray, e, rank) from None
                for line in said if n == 1 else [line for line in said if line.startswith("warning")]:
                    bar.write(line if n == 1 else f"rank {rank}: {line}", file=sys.stderr)
                bar.update(1)
    finally:
        ray.shutdown()
    if n == 1:
        return out
    from pile_tools.build import merge_shards

    return merge_shards([str(out)], str(out), echo=echo)
