"""Tensor parallelism on CPU with gloo: a TP2 model's loss and gradients equal the single-process model's."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from trainer.model import GPTNeoX, ModelConfig
from trainer.tensor_parallel import apply_tensor_parallel, partition_dim, vocab_parallel_cross_entropy


def config(parallel: bool, tp: int) -> ModelConfig:
    return ModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=500,
        gpt_j_residual=parallel,
        make_vocab_size_divisible_by=8 * tp,
    )


def reference(parallel: bool, tp: int, ids):
    torch.manual_seed(0)
    model = GPTNeoX(config(parallel, tp)).double()
    logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters()}


def worker(rank, world, store, parallel, ids, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = GPTNeoX(config(parallel, world)).double()
    apply_tensor_parallel(model, dist.group.WORLD, rank, world)
    logits = model(ids[:, :-1])
    start = rank * logits.shape[-1]
    loss = vocab_parallel_cross_entropy(logits, ids[:, 1:], dist.group.WORLD, start).mean()
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        dim = partition_dim(name)
        if dim is None:
            grads[name] = p.grad
        else:
            pieces = [torch.empty_like(p.grad) for _ in range(world)]
            dist.all_gather(pieces, p.grad.contiguous())
            grads[name] = torch.cat(pieces, dim=dim)
    if rank == 0:  # plain data (numpy), not tensors: torch's queue would share them with a process about to exit
        out.put((loss.item(), {name: g.numpy() for name, g in grads.items()}))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("parallel", [True, False])
def test_tp2_loss_and_gradients_equal_one_process(parallel, tmp_path):
    ids = torch.randint(0, 500, (3, 17), generator=torch.Generator().manual_seed(1))
    store = tmp_path / "store"  # a file store: no port to collide with
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, 2, store, parallel, ids, out)) for r in range(2)]
    for p in procs:
        p.start()
    loss, grads = out.get(timeout=120)
    loss, grads = torch.tensor(loss, dtype=torch.float64), {k: torch.from_numpy(v) for k, v in grads.items()}
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    want_loss, want_grads = reference(parallel, 2, ids)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)
    assert set(grads) == set(want_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def test_dry_run_lays_out_the_20b_run_without_building_the_model(run, monkeypatch):
    monkeypatch.setattr(GPTNeoX, "__init__", lambda *a, **k: pytest.fail("the dry run built the model"))
    out = run.ok("train", "--dry-run", "--config", "configs/20B.yml", "--world-size", 96).output
    assert "96 ranks = PP 4 x DP 12 x TP 2" in out and "global batch 1,536" in out
    stages = [line for line in out.splitlines() if line.startswith("stage")]
    assert len(stages) == 4 and all("(11 blocks)" in s for s in stages)
    assert "embed_in" in stages[0] and "embed_out" in stages[3]
    assert "1=(0, 0, 1), 2=(0, 1, 0)" in out  # TP peers are neighbours, then data, then pipe
    bad = run("train", "--dry-run", "--config", "configs/20B.yml", "--world-size", 100)
    assert bad.exit_code == 1 and "not a multiple of model_parallel_size x pipe_parallel_size" in bad.output


@pytest.mark.parametrize(
    "sets,world",
    [
        ([], 96),
        (["--set", "pipe_partition_method=uniform"], 16),
        (["--set", "num_layers=7", "--set", "pipe_parallel_size=3"], 6),
    ],
)
def test_plan_and_dry_run_agree_on_every_per_gpu_figure(run, sets, world):
    """The same stages, the same parameters on the most loaded GPU, the same memory: one partition, DeepSpeed's."""
    plan = json.loads(run.ok("plan", "--config", "configs/20B.yml", "--gpus", world, "--json", *sets).output)
    dry = run.ok("train", "--dry-run", "--config", "configs/20B.yml", "--world-size", world, *sets).output
    stages = [line for line in dry.splitlines() if line.startswith("stage")]
    per_rank = [int(s.split("; ")[1].split()[0].replace(",", "")) for s in stages]
    blocks = [int(s.split(" blocks)")[0].split("(")[-1]) if "blocks)" in s else 0 for s in stages]
    assert plan["parameters_per_gpu"] == max(per_rank) and plan["blocks_per_stage"] == blocks
    memory = dry.split("GiB: ")[1]
    for kind, gib in plan["memory_gib"].items():
        assert f"{kind.replace('_', ' ')} {gib:.1f}" in memory
