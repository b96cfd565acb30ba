"""build-shards --executor ray on a real local Ray cluster that the tests start (`ray start --head` on 127.0.0.1):
the ranks' bytes are one process's, a worker killed mid-rank is retried, a killed driver's rerun finishes."""

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from helpers import (
    NEOX,
    ROOT,
    SAMPLE,
    assert_clean_error,
    assert_same_build,
    lock_holder,
    parts_of,
    planned_parts,
    sample_as_one_jsonl,
    wait_for,
)

RAY = Path(sys.executable).parent / "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_processes(temp_dir: str) -> list[psutil.Process]:
    """The processes of the cluster started with `temp_dir`: each names it in its command line or holds a file of
    its session there (Ray's agents and workers name only themselves)."""
    found = []
    for p in psutil.process_iter():
        try:
            ours = any(temp_dir in part for part in p.cmdline()) or any(
                f.path.startswith(temp_dir) for f in p.open_files()
            )
        except psutil.Error:
            continue
        if ours and p.pid != os.getpid():
            found.append(p)
    return found


@pytest.fixture(scope="module")
def cluster():
    """A one-node Ray cluster on 127.0.0.1 with 2 CPUs, its address; stopped (its own processes only) after."""
    pytest.importorskip("ray", reason="Ray is not installed (make test installs it with the dev extra)")
    temp_dir = f"/tmp/ray-nd-{os.getpid()}"  # short: Ray's socket paths must fit in 107 bytes
    port = free_port()
    os.makedirs(temp_dir, exist_ok=True)
    token = Path(temp_dir) / "auth_token"  # Ray's token authentication, with a token of the test's own
    token.write_text(secrets.token_hex(32))
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_AUTH_MODE", "token")  # the cluster and every driver the tests start
    patch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    started = subprocess.run(
        [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
         "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp_dir],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    try:
        if started.returncode != 0:
            pytest.skip(f"a local Ray cluster would not start: {started.stderr.strip().splitlines()[-1:]}")
        yield f"127.0.0.1:{port}"
    finally:
        patch.undo()
        for p in (started := cluster_processes(temp_dir)):  # this cluster's, not another Ray of this machine
            p.kill()
        psutil.wait_procs(started, timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def many_parts(tmp_path_factory) -> Path:
    return sample_as_one_jsonl(tmp_path_factory.mktemp("ray-input"))


def build(inputs: Path, out: Path, *extra) -> list[str]:
    return ["build-shards", str(inputs), "--tokenizer", str(NEOX), "--output", str(out), "--split", "90,5,5",
            "--part-size", "64K", "--workers", "1", *map(str, extra)]  # fmt: skip


@pytest.fixture(scope="module")
def local(many_parts, tmp_path_factory) -> Path:
    """The single-process build every Ray build must equal."""
    out = tmp_path_factory.mktemp("ray-local") / "shards"
    neox(*build(many_parts, out))
    return out


def neox(*args, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert not check or done.returncode == 0, done.stdout + done.stderr[-3000:]
    return done


def test_four_ranks_on_ray_are_the_bytes_of_one_process(cluster, many_parts, local, tmp_path):
    out = tmp_path / "ray"
    done = neox(*build(many_parts, out, "--executor", "ray", "--ray-address", cluster, "--world-size", 4))
    assert "ranks on Ray" in done.stderr and "Traceback" not in done.stderr
    assert_same_build(out, local)
    again = neox(*build(many_parts, out, "--executor", "ray", "--ray-address", cluster, "--world-size", 4))
    assert "nothing to do" in again.stderr


def test_a_ray_worker_killed_mid_rank_is_retried_and_the_bytes_are_the_same(cluster, many_parts, local, tmp_path):
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "cli", *build(many_parts, out, "--executor", "ray", "--ray-address", cluster,
                                                 "--world-size", 2)]  # fmt: skip
    driver = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    n_parts = wait_for(lambda: planned_parts(out), "plan")
    wait_for(lambda: parts_of(out, 0, 2, n_parts)[0] >= 1, "rank 0's first part")
    worker = lock_holder(out, 0)
    os.kill(worker, signal.SIGKILL)  # the Ray worker process that runs rank 0, with parts of it still to encode
    committed, total = parts_of(out, 0, 2, n_parts)
    assert 1 <= committed < total, "the kill landed while rank 0 was encoding"
    stdout, stderr = driver.communicate(timeout=600)
    assert driver.returncode == 0, stderr[-3000:]
    assert "taking over the lock" in stderr, "the retried rank took over the killed worker's lock"
    assert lock_holder(out, 0) is None
    assert_same_build(out, local)


def test_a_killed_driver_started_again_finishes_without_redoing_done_ranks(cluster, many_parts, local, tmp_path):
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "cli", *build(many_parts, out, "--executor", "ray", "--ray-address", cluster,
                                                 "--world-size", 4)]  # fmt: skip
    driver = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    n_parts = wait_for(lambda: planned_parts(out), "plan")

    def done_ranks() -> list[int]:
        """The ranks with all their parts committed and their mark left."""
        marked = [r for r in range(4) if (out / ".parts" / f"rank-{r}-of-4").exists()]
        return [r for r in marked if (lambda committed, total: committed == total)(*parts_of(out, r, 4, n_parts))]

    wait_for(done_ranks, "a rank done")
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    done = done_ranks()
    assert 1 <= len(done) < 4 and not (out / "manifest.json").exists(), "the driver was killed mid-way"
    again = neox(*build(many_parts, out, "--executor", "ray", "--ray-address", cluster, "--world-size", 4))
    skipped = re.search(r"(\d) of 4 ranks already done", again.stderr)
    assert skipped and int(skipped[1]) >= len(done), again.stderr[-3000:]  # (the killed driver's may end some more)
    assert_same_build(out, local)


def test_without_ray_the_executor_says_how_to_install_it(tmp_path, run, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as where it is not installed
    result = run("build-shards", SAMPLE, "--tokenizer", "gpt-neox-20b", "--output", tmp_path / "s", "--executor", "ray")
    assert result.exit_code == 1
    assert_clean_error(result.output, "pip install 'neox-data[ray]'")


HOLD_RANK_LOCK = """
import sys, time
from pile_tools.runlock import RunLock
with RunLock(sys.argv[1], ".lock-rank0"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.mark.parametrize("holds_for, goes_on", [(1.0, True), (30.0, False)])
def test_a_rerun_driver_waits_for_a_killed_drivers_ranks_then_goes_on(tmp_path, monkeypatch, holds_for, goes_on):
    """A killed driver's rank still holding its lock (Ray ends it soon after) is waited for, up to PATIENCE_S."""
    import pile_tools.on_ray as on_ray
    from pile_tools.build import work_plan
    from pile_tools.options import BuildOptions
    from pile_tools.runlock import Held

    monkeypatch.setattr(on_ray, "PATIENCE_S", 3.0)
    plan = work_plan([str(SAMPLE)], str(NEOX), BuildOptions(world_size=2))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_RANK_LOCK, str(tmp_path), str(holds_for)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        said = []
        if goes_on:
            assert on_ray.claim(tmp_path, plan, said.append) is False and (tmp_path / "plan.json").is_file()
        else:
            with pytest.raises(Held, match="in use by another run"):
                on_ray.claim(tmp_path, plan, said.append)
        assert len(said) == 1 and said[0].startswith("waiting up to 3 s for a run to leave")
    finally:
        holder.kill()


def test_an_address_where_no_ray_answers_is_one_line_at_once(tmp_path, run, monkeypatch):
    """Ray would retry such an address for minutes; the command says so in one line, never reaching ray.init."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (make test installs it with the dev extra)")
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init was called for an address that is down"))
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    result = run("build-shards", SAMPLE, "--tokenizer", "gpt-neox-20b", "--output", tmp_path / "s", "--executor", "ray",
                 "--ray-address", address)  # fmt: skip
    assert result.exit_code == 1
    assert_clean_error(result.output, f"--ray-address {address}: no Ray cluster answers there", "ray start --head")


def test_a_ranks_own_error_is_one_line_naming_the_rank_and_the_file(cluster, tmp_path):
    """An error of the build inside a rank (here a bad line under --strict) is not retried, and reads as it would
    without Ray, after the rank's number."""
    (tmp_path / "in.jsonl").write_text('{"text": "a document"}\n{"text": 5}\n')
    done = neox(*build(tmp_path / "in.jsonl", tmp_path / "s", "--executor", "ray", "--ray-address", cluster,
                       "--world-size", 2, "--strict"), check=False)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    [line] = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert line.startswith("Error: rank ") and "in.jsonl:2" in line, line


def test_a_ranks_encoding_workers_do_not_run_rays_worker_script_again(tmp_path, monkeypatch):
    """multiprocessing's spawn runs the parent's `__main__` file again in each child; in a Ray worker that file is
    Ray's default_worker.py (importing Ray, 0.7 s a pool). While a rank builds, its children are spawned without
    it: a stand-in main file that leaves a mark when run is run by a child outside, not inside."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from pile_tools.on_ray import without_main_file

    script = tmp_path / "worker_main.py"
    script.write_text(f"open({str(tmp_path / 'ran')!r} + str(__import__('os').getpid()), 'w').close()\n")
    monkeypatch.setattr(sys.modules["__main__"], "__file__", str(script), raising=False)
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None, raising=False)

    def spawn_one() -> int:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            return pool.submit(os.getpid).result()

    with without_main_file():
        quiet = spawn_one()
    assert not (tmp_path / f"ran{quiet}").exists() and sys.modules["__main__"].__file__ == str(script)
    loud = spawn_one()
    assert (tmp_path / f"ran{loud}").exists()  # the control: outside, the child runs it
