"""A run's start-up, in its order, up to the steps (trainer.train.Trainer): checks, the run lock, the process
group, the checkpoint to resume, the trainer; and how a rank lost on the way ends the others."""

import contextlib
import os
from pathlib import Path

import torch.distributed as dist

from pile_tools.ground import check_writable, long_lived
from pile_tools.runlock import RunLock
from trainer.checkpoint import choose_checkpoint, starting_weights, step_of
from trainer.config import NeoXConfig
from trainer.engine import init_distributed
from trainer.preflight import check_run
from trainer.stopping import PeerLost, StopRequests, lost_peer, lost_ranks_line
from trainer.train import Trainer


def train(config: NeoXConfig, stops: StopRequests) -> dict:
    """Train from the loaded position (or step 0) to train_iters; paths, data and precision come resolved in
    `config`. The whole start-up, in its order:
      1. check_run: every check that needs no process group (config, shards and vocabulary, layout and batch,
         --save and --load), so a bad run costs nothing;
      2. rank 0 holds --save's lock for the whole run; every rank joins the process group;
      3. the checkpoint to resume (choose_checkpoint: `latest`, else the newest that verifies) or whose weights
         start the run (starting_weights), verified on all ranks; a run already at train_iters (a finished job
         requeued) returns here, building nothing: {"step", "finished": the checkpoint};
      4. Trainer: the sample indices (rank 0 builds them first), the model with those weights in its DeepSpeed
         engine, the restored position and identity, the metrics;
      5. Trainer.run: the steps, evaluations and saves.
    A rank lost on the way (its process or node died) ends every other rank at its next collective with PeerLost,
    naming it; the process group is then left as it is (tearing it down could wait on the lost peer)."""
    sources, tokenizer, load, weights, packing = check_run(config)
    save = config.paths.save
    owner = save is not None and int(os.environ.get("RANK", 0)) == 0
    if owner:
        check_writable(Path(save))
    lost = False
    try:
        with RunLock(Path(save)) if owner else contextlib.nullcontext():
            init_distributed(config.parallel.distributed_timeout_minutes)
            try:
                return train_in_group(config, stops, sources, tokenizer, load, weights, packing)
            except RuntimeError as e:
                if dist.get_world_size() == 1 or not lost_peer(e):
                    raise
                lost = True
                raise PeerLost(lost_ranks_line(e)) from None
    finally:
        if dist.is_initialized() and not lost:
            dist.destroy_process_group()


def train_in_group(config: NeoXConfig, stops: StopRequests, sources, tokenizer, load, weights, packing) -> dict:
    """train()'s steps 3 to 5, in the process group."""
    resume = (Path(load), choose_checkpoint(Path(load))) if load is not None else None  # verified
    weights = (weights, starting_weights(weights)) if weights is not None else None  # verified
    done = resume[0] / resume[1][0] if resume is not None else None  # the checkpoint it resumes from
    if done is not None and step_of(done.name) >= config.training.train_iters:
        dist.barrier()
        return {"step": step_of(done.name), "finished": str(done)}
    with long_lived():
        trainer = Trainer(config, sources, resume, tokenizer, weights, packing, stops)
    results = trainer.run()
    dist.barrier()  # leave together: a rank tearing down gloo while another still works aborts at exit
    return results
