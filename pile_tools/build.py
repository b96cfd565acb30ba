"""build-shards: plan the parts, check the output directory, run the parts on workers, then assemble.

The plan (`DIR/plan.json`) fixes everything that decides the output bytes: inputs, tokenizer, split, options.
Its hash, the fingerprint, is what lets a rerun resume, lets `--rank` runs be merged, and refuses to mix two
different runs in one directory. Workers, rank and world size are not in it: they never change the bytes.
"""

import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import asdict, replace
from pathlib import Path

from tqdm import tqdm

from pile_tools.assemble import assemble
from pile_tools.components import load_epochs
from pile_tools.encoding import ENGINES, choose_engine, eod_id, file_sha256, load_reference, resolve_tokenizer
from pile_tools.ground import InputError
from pile_tools.indexed import token_dtype
from pile_tools.join import RANK_MARK, Joiner, holds_its_tokens, whole_part_problem
from pile_tools.options import BuildOptions
from pile_tools.parts import PartConfig, cached_encoder, process_part, split_thresholds
from pile_tools.reader import HF_PREFIX, Part, cut_into_parts, discover, guard_sample, part_bytes
from pile_tools.runlock import NAME as LOCK
from pile_tools.runlock import RunLock
from pile_tools.shards_dir import (
    MANIFEST,
    PLAN,
    fingerprint,
    has_manifest,
    read_plan,
    remove_plan,
    run_fingerprints,
    write_plan,
)


def describe_input(source: str) -> dict:
    """An input as plan.json records it: its path, and for a local file its size and mtime."""
    if source.startswith(HF_PREFIX):
        return {"path": source}
    stat = os.stat(source)
    return {"path": source, "size": stat.st_size, "mtime": int(stat.st_mtime)}


def work_plan(inputs, tokenizer, options: BuildOptions) -> dict:
    """Everything that decides the output, checked and resolved before any work."""
    sources = discover(inputs)
    tok_path = resolve_tokenizer(tokenizer)
    reference = load_reference(tok_path)
    load_epochs(options.weights)  # fail now on a bad --weights, not after the encoding
    vocab = reference.get_vocab_size(with_added_tokens=True)
    plan = {
        "tokenizer": {
            "path": str(tok_path),
            "sha256": file_sha256(tok_path),
            "vocab_size": vocab,
            "eod": eod_id(reference, tok_path),
            "dtype": token_dtype(vocab).name,
        },
        "options": options.decisive(),
        "inputs": [describe_input(s) for s in sources],
        "parts": [asdict(p) for p in cut_into_parts(sources, options.part_size)],
    }
    plan["fingerprint"] = fingerprint(plan)
    return plan


def rank_parts(plan: dict, rank: int, world_size: int) -> list[int]:
    """The indices of the plan's parts that `--rank` encodes (all of them with world size 1)."""
    return [p["index"] for p in plan["parts"] if p["index"] % world_size == rank]


def committed_parts(out: Path) -> list[Path]:
    """Parts committed by their rename (NNNNN/); a NNNNN.tmp-PID/ may hold a receipt, but was never committed."""
    return [p for p in (out / ".parts").glob("[0-9]*") if p.name.isdigit() and (p / "receipt.json").is_file()]


def claim_output(out: Path, plan: dict) -> bool:
    """Check `out` can take this run; True when it already holds this run's finished shards.

    A different run's plan.json with no committed part (a run that failed at once), or a damaged one, is no work
    to protect."""
    try:
        found = run_fingerprints(out)
    except InputError:
        if has_manifest(out) or committed_parts(out):
            raise
        found = [(PLAN, None)]
    for name, theirs in found:
        if theirs == plan["fingerprint"]:
            return name == MANIFEST
        if name == MANIFEST or committed_parts(out):
            raise InputError(
                f"{out} holds the shards of a different run ({name} fingerprint {theirs}, this run "
                f"{plan['fingerprint']}: inputs, tokenizer or options differ); use another --output or remove it"
            )
        shutil.rmtree(out / ".parts", ignore_errors=True)
        remove_plan(out)
    if out.is_dir() and any(not p.name.startswith(LOCK) for p in out.iterdir()):
        raise InputError(f"{out} is not empty and holds no neox-data run; use an empty or new --output directory")
    out.mkdir(parents=True, exist_ok=True)
    write_plan(out, plan)
    return False


class Progress:
    """One tqdm bar over input bytes, with documents, text MB and tokens per second."""

    def __init__(self, total: int, done_parts: int, n_parts: int):
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="encoding", dynamic_ncols=True, disable=None)
        self.start, self.docs, self.tokens, self.text = time.time(), 0, 0, 0
        self.parts, self.n_parts = done_parts, n_parts

    def __call__(self, nbytes, docs, tokens, text):
        self.docs, self.tokens, self.text = self.docs + docs, self.tokens + tokens, self.text + text
        dt = max(time.time() - self.start, 1e-9)
        self.bar.set_postfix_str(
            f"parts {self.parts}/{self.n_parts} docs {self.docs / dt:,.0f}/s text {self.text / dt / 1e6:.1f} MB/s "
            f"tokens {self.tokens / dt / 1e6:.2f}M/s",
            refresh=False,
        )
        self.bar.update(nbytes)


def _init_worker(q, tokenizer: str):
    global _progress_queue
    _progress_queue = q
    for signum in (signal.SIGINT, signal.SIGTERM):  # the main process decides: a part under way is finished
        signal.signal(signum, signal.SIG_IGN)
    try:  # warm up: imports and the likeliest engine load while the main process checks exactness
        cached_encoder(tokenizer, "gigatoken", False)
    except Exception:
        pass


def _run_in_worker(part, config, parts_dir):
    return process_part(part, config, parts_dir, lambda *a: _progress_queue.put(a))


def submission_order(todo: list[Part], workers: int) -> list[Part]:
    """Part order, the order the joiner appends them in, except that parts over half a worker's share of the
    input go first (still in part order): a long pole started last would make the run wait for it alone."""
    share = sum(map(part_bytes, todo)) / (2 * workers)
    return sorted(todo, key=lambda p: (part_bytes(p) <= share, p.index))


class Workers:
    """`n` spawned encoding processes (none for n <= 1), started early so their start-up overlaps other work."""

    def __init__(self, n: int, tokenizer: str):
        self.n, self.pool = n, None
        if n > 1:
            ctx = mp.get_context("spawn")  # not fork: the tokenizer libraries' thread pools do not survive a fork
            self.queue = ctx.Queue()
            self.pool = ProcessPoolExecutor(
                n, mp_context=ctx, initializer=_init_worker, initargs=(self.queue, tokenizer)
            )
            for _ in range(n):  # a process starts per submitted task while none is idle
                self.pool.submit(int)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool:
            self.pool.shutdown(cancel_futures=True)

    def run(self, todo, config: PartConfig, parts_dir: Path, progress: Progress, verdict, joiner) -> None:
        """Process parts here or on the pool (in submission_order); re-raise the first failure, the joiner's too
        (`joiner` may be None). `verdict`, a future of the engine the exactness check chooses, lets the pool start with
        config.engine before the check ends: if it chooses another, WrongGuess, once the parts under way end."""
        if self.pool is None:
            for part in todo:
                process_part(part, config, parts_dir, progress)
                progress.parts += 1
                if joiner is not None:
                    joiner.raise_if_failed()
            return
        pending = {self.pool.submit(_run_in_worker, p, config, parts_dir) for p in submission_order(todo, self.n)}
        while pending or verdict is not None:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            while not self.queue.empty():
                progress(*self.queue.get())
            if joiner is not None:
                joiner.raise_if_failed()  # a full disk stops the run now, not after the last part
            failed = any(f.exception() is not None for f in done)
            if verdict is not None and (verdict.done() or failed or not pending):
                if verdict.result() != config.engine:  # a failure may be the guessed engine's own: not reported
                    for f in pending:
                        f.cancel()
                    wait(pending)
                    raise WrongGuess(verdict.result())
                verdict = None
            for f in done:
                if f.exception() is not None:
                    raise f.exception()
                progress.parts += 1


class WrongGuess(Exception):
    """The exactness check chose another engine than the one the workers started with."""

    def __init__(self, engine: str):
        super().__init__(engine)
        self.engine = engine


def encode_parts(todo: list[Part], n_parts: int, plan: dict, parts_dir: Path, run: BuildOptions, echo, timings, joiner):
    """Encode the parts on `workers` processes with the first engine whose ids equal `tokenizers`' on a sample of
    them. One process checks first (the check would take the encoder's cores); workers start at once with the
    first engine while the check runs beside them, and the parts start again with the engine it chose if that
    is another (gigatoken fails the check only on a tokenizer it does not support). `joiner` (or None) starts
    joining the parts once the check has confirmed the engine they are made with."""
    options, tokenizer = plan["options"], plan["tokenizer"]
    path, mark = Path(tokenizer["path"]), time.time()
    config = PartConfig(
        tokenizer=tokenizer["path"],
        engine=ENGINES[0],
        eod=tokenizer["eod"],
        dtype=tokenizer["dtype"],
        split_thresholds=split_thresholds(options["split"]),
        component=options["component"],
        max_doc_bytes=options["max_doc_bytes"],
        strict=run.strict,
        threaded=run.workers <= 1,
    )
    workers = run.workers
    with Workers(workers, tokenizer["path"]) as pool, ThreadPoolExecutor(1) as checker:
        verdict = checker.submit(lambda: choose_engine(path, guard_sample(todo, options["component"]), echo))
        if pool.pool is None:
            config, verdict = replace(config, engine=verdict.result()), None
        if joiner is not None:
            joiner.start_joining_once(verdict, config.engine)
        timings["start_workers_and_check_engine"] = time.time() - mark
        mark = time.time()
        checked = f"{config.engine}" if verdict is None else f"{config.engine} (checked against tokenizers meanwhile)"
        echo(f"encoding {len(todo)} of {n_parts} parts with {checked} on {workers} worker(s)")
        try:
            encode_with(pool, todo, n_parts, config, parts_dir, verdict, joiner)
        except WrongGuess as wrong:
            for part in todo:  # the parts made with the engine the check refused
                shutil.rmtree(parts_dir / f"{part.index:05d}", ignore_errors=True)
            echo(f"encoding the {len(todo)} parts again with {wrong.engine}")
            if joiner is not None:
                joiner.start_joining_once(None, wrong.engine)
            encode_with(pool, todo, n_parts, replace(config, engine=wrong.engine), parts_dir, None, joiner)
        timings["encode_parts"] = time.time() - mark


def encode_with(pool: Workers, todo, n_parts: int, config: PartConfig, parts_dir: Path, verdict, joiner) -> None:
    """Run the parts on the pool under one progress bar."""
    progress = Progress(sum(map(part_bytes, todo)), n_parts - len(todo), n_parts)
    try:
        pool.run(todo, config, parts_dir, progress, verdict, joiner)
    finally:
        progress.bar.close()


def build_shards(inputs, tokenizer, output, options: BuildOptions, echo=print):
    """Run build-shards; returns the output directory once final shards are there, else None (a rank's share).
    One process per output directory (per rank, with --world-size): a second is refused, naming the first."""
    start = time.time()
    plan = work_plan(inputs, tokenizer, options)
    timings = {"plan_parts": time.time() - start}
    out = Path(output)
    one = options.world_size == 1
    lock = LOCK if one else f"{LOCK}-rank{options.rank}"
    what = str(out) if one else f"{out} (rank {options.rank})"
    with RunLock(out, lock, what, excludes=(f"{LOCK}-rank*",) if one else (LOCK,)), term_as_interrupt():
        try:
            return run_build(out, plan, start, timings, options, echo)
        except KeyboardInterrupt as stop:
            raise stopped(stop, what, out, plan, options) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as Ctrl-C's KeyboardInterrupt is."""


@contextlib.contextmanager
def term_as_interrupt():
    """SIGTERM (scancel, a preemption, `kill`) stops a build as Ctrl-C does, where nothing else handles it yet (a
    Ray worker has its own handler) and this is the main thread."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def interrupt(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stopped(stop: KeyboardInterrupt, what: str, out: Path, plan: dict, options: BuildOptions) -> InputError:
    """The one line of a build stopped by SIGTERM or Ctrl-C once the parts under way were finished; exit status
    128 + the signal's number, as the shell gives a process it ended."""
    signum = signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT
    mine = set(rank_parts(plan, options.rank, options.world_size))
    done = sum(int(p.name) in mine for p in committed_parts(out))
    error = InputError(
        f"{what}: stopped by {signum.name} with {done} of {len(mine)} parts committed; the same command goes on "
        "from there"
    )
    error.exit_code = 128 + signum
    return error


def give_back_unfit(parts_dir: Path, mine: list[int], echo) -> None:
    """Remove a rank's committed parts that merge-shards could not join, to be encoded again: those a
    single-machine run in the same directory joined into its shards, keeping no tokens of them, and those cut
    short or damaged since (their shards' sizes are not as their receipts record)."""
    joined, broken = [], []
    for where in (parts_dir / f"{i:05d}" for i in mine):
        if not (where / "receipt.json").is_file():
            continue
        if not holds_its_tokens(where):
            joined.append(where)
        elif (problem := whole_part_problem(where)) is not None:
            broken.append(problem)
        else:
            continue
        shutil.rmtree(where)
    if joined:
        echo(
            f"warning: {len(joined)} part(s) of this rank were joined by a run without --world-size and kept no "
            "tokens of their own; they are encoded again for merge-shards"
        )
    if broken:
        echo(f"warning: {len(broken)} committed part(s) of this rank are not whole, and are encoded again: {broken[0]}")


def mark_rank(parts_dir: Path, rank: int, world_size: int) -> None:
    """Leave `.parts/rank-R-of-N`, which tells merge-shards which directory a rank writes to."""
    (parts_dir / f"{RANK_MARK}{rank}-of-{world_size}").touch()


def run_build(out: Path, plan: dict, start: float, timings: dict, options: BuildOptions, echo):
    """build_shards' work, once this process holds the output directory (or its rank's share)."""
    if claim_output(out, plan):
        echo(f"{out} already holds this run's shards (manifest.json); nothing to do")
        return out
    parts = [Part(**p) for p in plan["parts"]]
    parts_dir = out / ".parts"
    parts_dir.mkdir(exist_ok=True)
    rank, world_size = options.rank, options.world_size
    mine = rank_parts(plan, rank, world_size)
    for stale in parts_dir.glob("*.tmp-*"):  # another rank's, in a shared directory, may be under way
        if stale.name[:5].isdigit() and int(stale.name[:5]) in mine:
            shutil.rmtree(stale, ignore_errors=True)
    joiner = Joiner(out, parts_dir, len(parts), echo) if world_size == 1 else None  # joins while the parts encode
    if joiner is None:
        mark_rank(parts_dir, rank, world_size)
        give_back_unfit(parts_dir, mine, echo)
    todo = [  # after the joiner's start: it may drop parts it cannot vouch for
        p
        for p in parts
        if p.index % world_size == rank and not (parts_dir / f"{p.index:05d}" / "receipt.json").is_file()
    ]
    try:
        if todo:
            encode_parts(todo, len(parts), plan, parts_dir, options, echo, timings, joiner)
        if joiner is None:
            echo(
                f"rank {rank} of {world_size}: its parts are in {parts_dir}; when every rank is done, run "
                f"neox-data merge-shards DIR... --output DIR"
            )
            return None
        assemble(out, plan, [out], start=start, echo=echo, timings=timings, joiner=joiner)
    except BaseException:
        if joiner is not None:
            joiner.abandon()
        raise
    return out


def merge_shards(dirs: list[str], output: str, echo=print) -> Path:
    """Join the parts of `--rank` runs (each dir holding some, all of one plan) into final shards in `output`."""
    start = time.time()
    paths = [Path(d) for d in dirs]
    plans = []
    for d in paths:
        if (plan := read_plan(d)) is None:
            raise InputError(f"{d}: no plan.json; not the output of a build-shards --rank run, or already merged")
        plans.append(plan)
    if len({p["fingerprint"] for p in plans}) > 1:
        raise InputError(
            "the directories hold different runs (their plan.json fingerprints differ); "
            "merge only the ranks of one build-shards command"
        )
    out = Path(output)
    with RunLock(out, excludes=(f"{LOCK}-rank*",)):
        if out.resolve() not in [d.resolve() for d in paths] and claim_output(out, plans[0]):
            echo(f"{out} already holds this run's shards (manifest.json); nothing to do")
            return out
        assemble(out, plans[0], paths, start=start, echo=echo)
    return out
