"""neox-data train: the GPT-NeoX model on DeepSpeed, from shards to checkpoints, resumable to the sample.

One process (`neox-data train`, the CPU default) or many under the `deepspeed` launcher (data parallelism; each
rank reads its own slice of every global batch). Every check of the config and the data runs before the process
group, the model or any index is built, so a bad config costs nothing.
"""

import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.checkpoint import (
    has_run,
    load_training_checkpoint,
    save_training_checkpoint,
    warn_once,
)
from trainer.config import NeoXConfig
from trainer.config_keys import RunError
from trainer.data_only import guard_deepspeed_loads
from trainer.engine import (
    deepspeed_config,
    init_distributed,
    keep_clip_norm,
    make_optimizer,
    make_scheduler,
    plain_fp32,
)
from trainer.metrics import Metrics, Timeline, peak_flops, peak_memory_gib, plot_losses
from trainer.model import IGNORED, Block, GPTNeoX, checkpoint_blocks, lm_loss
from trainer.pipeline import build_pipeline
from trainer.plan import step_flops
from trainer.reshard import load_state_dict, local_state
from trainer.samples import (
    Packing,
    build_datasets,
    data_order,
    fallback_cache_dir,
    micro_batch,
    order_changes,
    sample_positions,
)
from trainer.stopping import Stopped, StopRequests


class Trainer:
    """The engine, the data and the position: `run()` trains from the position to train_iters. `resume`: the
    --load directory and choose_checkpoint's answer for it, or None; `weights`: (the --load directory, the
    checkpoint in it) whose weights start the run at step 0 (finetune), or None."""

    def __init__(
        self,
        config: NeoXConfig,
        sources: dict,
        resume: tuple | None,
        tokenizer: str | None,
        weights,
        packing: Packing,
        stops: StopRequests,
    ):
        save = config.paths.save
        self.stops, self.flags = stops, None
        self.config, self.save, self.tokenizer, self.packing = config, Path(save) if save else None, tokenizer, packing
        deepspeed = init_distributed(config.parallel.distributed_timeout_minutes)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        self.dp, self.global_batch = config.data_parallel_size(self.world), config.global_batch(self.world)
        self.pipelined = config.parallel.pipelined
        self.data = self.build_data(sources)
        compiled = self.build_engine(deepspeed, weights and weights[1])
        note = self.restore(resume, weights)
        self.nonfinite = []  # the steps, in a row, whose loss or gradient norm was nan or inf
        self.open_metrics(note, compiled)
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="next-batch")
        self.ahead = None  # (step, future): the next step's micro-batches, read while this step computes
        self.data_wait = 0.0

    def build_engine(self, deepspeed, weights: Path | None) -> int:
        """This rank's model (with the weights of the checkpoint `weights`, if given) in a DeepSpeed engine whose
        checkpoint reads are data only; the number of blocks compiled."""
        config = self.config
        model, compiled = self.build_model(weights)
        optimizer = make_optimizer(model, config.optimizer, config.precision.fp16)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=make_scheduler(optimizer, config.optimizer),
            config=deepspeed_config(config, self.world),
        )
        keep_clip_norm(self.engine)
        guard_deepspeed_loads(self.engine)
        self.plain_fp32 = plain_fp32(config)
        if self.plain_fp32 and self.world == 1:
            self.engine.enable_backward_allreduce = False  # one process: nothing to average, skip the copies
        return compiled

    def restore(self, resume: tuple | None, weights: tuple | None) -> str | None:
        """The run's position and identity: step 0 and a new run id, or the checkpoint `resume` names restored
        (in any layout); a note for the log, if any."""
        p = self.config.parallel
        self.step, self.protected, self.resumed, note = 0, set(), resume is not None, None
        self.identity = {"run_id": uuid.uuid4().hex}
        if weights is not None:
            self.identity["started_from"] = str(weights[0].resolve())
            note = f"starting at step 0 from the weights of {weights[1]} (a new optimizer, schedule and data order)"
        if resume is not None:
            load, chosen = resume
            layout = (p.model_parallel_size, p.pipe_parallel_size, self.dp)
            state = load_training_checkpoint(
                self.engine, load, chosen, self.config, layout, self.tp_rank, self.pipelined
            )
            self.step, note = state["iteration"], state.get("note")
            self.identity.update(state["identity"])
            if state["fallback"]:  # the newest checkpoint that verifies is never pruned by this run
                self.protected.add(state["tag"])
            if self.rank == 0 and state.get("data_order"):
                self.check_order(state["data_order"], load / state["tag"])
        return note

    def open_metrics(self, note: str | None, compiled: int) -> None:
        """Rank 0's metrics.jsonl, TensorBoard and log line, from the restored step on; the start-up's notes."""
        config = self.config
        where = config.paths.log_dir or config.paths.save
        self.metrics_dir = Path(where) if where else None
        t = config.training
        self.metrics = Metrics(
            self.metrics_dir, config.paths.tensorboard_dir, t.log_interval, t.train_iters, self.step, self.rank
        )
        name = torch.cuda.get_device_name() if self.device is not None else ""
        self.peak = peak_flops(name) if config.precision.mixed else None
        if note:
            self.metrics.echo(note)
        if compiled:
            self.metrics.echo(
                f"torch.compile: {compiled} blocks, compiled on their first call (step "
                f"{self.step + 1}'s time includes it; compile: false turns it off)"
            )

    def build_model(self, weights: Path | None):
        """(this rank's model, the number of blocks compiled): the pipeline's stage and TP slice, or the whole
        model, with the weights of the checkpoint `weights` if given; activation checkpointing and compile applied
        from outside the model."""
        config = self.config
        if self.pipelined:  # tensor x pipeline x data: trainer/pipeline.py
            model, grid = build_pipeline(config, self.world)
            self.dp_rank, self.tp_rank = grid.get_data_parallel_id(), grid.get_slice_parallel_rank()
        else:
            torch.manual_seed(config.training.seed)
            model, self.dp_rank, self.tp_rank = GPTNeoX(config.model), self.rank, 0
        if weights is not None:  # before DeepSpeed copies them (fp32 masters, ZeRO partitions)
            p = config.parallel
            full = load_state_dict(weights)
            model.load_state_dict(
                local_state(full, model, self.tp_rank, p.model_parallel_size, self.pipelined, config.model.num_layers)
            )
        if config.model.checkpoint_activations and not self.pipelined:  # the pipeline engine checkpoints its own
            checkpoint_blocks(model)
        compile_blocks = config.training.compile if config.training.compile is not None else self.device is not None
        blocks = [m for m in model.modules() if isinstance(m, Block)] if compile_blocks else []
        for block in blocks:  # default on CUDA; regional: one graph per block shape, reused by every block
            block.compile()
        return model, len(blocks)

    def build_data(self, sources: dict) -> dict:
        """Rank 0 builds (and caches) the sample indices first; the others then read them."""
        if self.rank != 0:
            dist.barrier()
        data = build_datasets(self.config, sources, self.global_batch, fallback_cache_dir(self.save))
        if self.rank == 0:
            dist.barrier()
        return data

    def order(self) -> dict:
        """The record of the data order at the step just taken (see samples.data_order)."""
        return data_order(self.data["train"], self.config, self.global_batch, self.dp, self.step)

    def check_order(self, saved: dict, where: Path) -> None:
        """Warn when this run's settings would have read other samples at the loaded step than the saved run did
        (other shards, seed, batch, seq_length or train_iters), naming what changed: the run goes on, in the order
        gpt-neox gives those settings, not the one it started with."""
        changes = order_changes(saved, self.order())
        if changes:
            warn_once(
                f"--load {where}: these settings give step {self.step} other samples than the run read "
                f"({'; '.join(changes)}); the data order changes from here"
            )

    def batch(self, split: str, step: int, micro_step: int) -> torch.Tensor:
        """This rank's micro-batch `micro_step` of step `step` of a split, on the device."""
        t = self.config.training
        ids = micro_batch(
            self.data[split],
            step,
            micro_step,
            t.train_micro_batch_size_per_gpu,
            self.dp,
            self.dp_rank,
            self.global_batch,
        )
        return ids.to(self.device, non_blocking=True) if self.device is not None else ids

    def read_step(self, step: int) -> list[torch.Tensor]:
        """This rank's micro-batches of train step `step`, on the host (pinned for an asynchronous copy on CUDA)."""
        t = self.config.training
        batches = [
            micro_batch(
                self.data["train"], step, m, t.train_micro_batch_size_per_gpu, self.dp, self.dp_rank, self.global_batch
            )
            for m in range(t.gradient_accumulation_steps)
        ]
        return [ids.pin_memory() for ids in batches] if self.device is not None else batches

    def step_batches(self) -> list[torch.Tensor]:
        """The current step's micro-batches, read ahead in a thread while the previous step ran; the time this
        step still waited for them is kept for metrics.jsonl (data_wait_s). The next step's read starts here."""
        start = time.perf_counter()
        ahead, self.ahead = self.ahead, None
        batches = ahead[1].result() if ahead is not None and ahead[0] == self.step else self.read_step(self.step)
        self.data_wait = time.perf_counter() - start
        if self.step + 1 < self.config.training.train_iters:
            self.ahead = (self.step + 1, self.reader.submit(self.read_step, self.step + 1))
        return [ids.to(self.device, non_blocking=True) for ids in batches] if self.device is not None else batches

    def pairs(self, split: str, step: int):
        """The pipeline engine's micro-batches: (inputs, targets) for each accumulation step."""
        for m in range(self.config.training.gradient_accumulation_steps):
            yield self.pipe_pair(self.batch(split, step, m))

    def pipe_pair(self, ids: torch.Tensor) -> tuple:
        """(inputs, targets) of a micro-batch for the pipeline engine: the ids, or with packing (ids, positions,
        documents), both always there (trainer/pipeline.py passes on those the run asked for)."""
        inputs, targets = self.packing.split(ids)
        if not self.packing.on:
            return inputs["ids"], targets
        x = inputs["ids"]
        steps = torch.arange(x.shape[1], device=x.device).expand_as(x)
        positions, documents = inputs["positions"], inputs["documents"]
        return (
            x,
            steps if positions is None else positions,
            torch.zeros_like(x) if documents is None else documents,
        ), targets

    def train_step(self) -> tuple:
        """One optimizer step over the global batch: (loss averaged over it on all ranks, lr, gradient norm), the
        loss and norm left where they are (a tensor on the GPU: reading them waits for it; see flush)."""
        steps = self.config.training.gradient_accumulation_steps
        lr, norm, losses = self.engine.get_lr()[0], None, []
        batches = self.step_batches()
        if self.pipelined:  # 1F1B over the micro-batches; the loss comes back averaged over DP, on every rank
            loss = self.engine.train_batch(data_iter=iter([self.pipe_pair(ids) for ids in batches]))
            return loss.detach(), lr, self.engine.get_global_grad_norm()
        for m, ids in enumerate(batches):
            inputs, targets = self.packing.split(ids)
            loss = lm_loss(self.engine(**inputs), targets, masked=self.packing.mask_loss)
            self.engine.backward(loss)
            if m == steps - 1 and self.plain_fp32:  # the reduced gradients, before the step (see plain_fp32)
                clip = self.config.optimizer.gradient_clipping
                norm = torch.nn.utils.clip_grad_norm_(self.engine.module.parameters(), clip or float("inf"))
            self.engine.step()
            losses.append(loss.detach())
        loss = torch.stack(losses).mean()
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        return loss, lr, norm if norm is not None else self.engine.get_global_grad_norm()

    @torch.no_grad()
    def evaluate(self, split: str, part: int = 0) -> dict | None:
        """Loss and perplexity over part `part` of the split (eval_iters global batches; gpt-neox reads a fresh part
        at each evaluation), and the loss per component."""
        dataset = self.data[split]
        if dataset is None:
            return None
        t = self.config.training
        steps = range(part * t.eval_iters, (part + 1) * t.eval_iters)
        if self.pipelined:  # the pipeline engine gives the mean loss only: no per-component split
            losses = [self.engine.eval_batch(self.pairs(split, it)).item() for it in steps]
            return self.eval_entry(split, part, sum(losses) / len(losses), {})
        self.engine.eval()
        sums = torch.zeros(len(dataset.sources), dtype=torch.float64)
        counts = torch.zeros_like(sums)
        for it in steps:
            for m in range(t.gradient_accumulation_steps):
                inputs, targets = self.packing.split(self.batch(split, it, m))
                per_token = lm_loss(self.engine(**inputs), targets, reduction="none")
                if self.packing.mask_loss:  # the mean over each sample's counted targets
                    per_sample = (per_token.sum(1) / (targets != IGNORED).sum(1).clamp(min=1)).double().cpu()
                else:
                    per_sample = per_token.mean(1).double().cpu()
                where = sample_positions(
                    it, m, t.train_micro_batch_size_per_gpu, self.dp, self.dp_rank, self.global_batch, len(dataset)
                )
                source = torch.from_numpy(dataset.source[where].astype("int64"))
                sums.index_add_(0, source, per_sample)
                counts.index_add_(0, source, torch.ones_like(per_sample))
        self.engine.train()
        if self.world > 1:
            for x in (sums, counts):
                dist.all_reduce(x)
        components = {n: (s / c).item() for n, s, c in zip(dataset.names, sums, counts) if c > 0}
        return self.eval_entry(split, part, (sums.sum() / counts.sum()).item(), components)

    def eval_entry(self, split: str, part: int, loss: float, components: dict) -> dict:
        """An evaluation's metrics.jsonl entry."""
        return {
            "kind": split,
            "step": self.step,
            "part": part,
            "loss": loss,
            "ppl": math.exp(loss),
            "components": components,
        }

    def train_entry(self, step: int, loss: float, lr: float, grad_norm: float | None, seconds: float, wait: float):
        """The metrics.jsonl entry of a step."""
        t = self.config.training
        model_flops, hardware_flops = step_flops(self.config, self.global_batch)
        tflops = hardware_flops / seconds / self.world / 1e12
        return {
            "kind": "train",
            "step": step,
            "loss": loss,
            "lr": lr,
            "loss_scale": float(getattr(self.engine.optimizer, "cur_scale", 1.0)),
            "grad_norm": grad_norm,
            "tokens_per_s": self.global_batch * t.seq_length / seconds,
            "tflops_per_gpu": tflops if self.device is not None else None,
            "mfu": model_flops / seconds / self.world / self.peak if self.peak else None,
            "hfu": hardware_flops / seconds / self.world / self.peak if self.peak else None,  # recompute counted
            "consumed_samples": step * self.global_batch,
            "data_wait_s": wait,
            "peak_memory_gib": peak_memory_gib(self.device),
            "elapsed_s": seconds,
        }

    def checkpoint(self) -> None:
        """Save the engine, the position and the run's identity under --save (no-op without one)."""
        if self.save is not None:
            state = {"iteration": self.step, "consumed_samples": self.step * self.global_batch}
            state["data_order"] = self.order() if self.rank == 0 else None  # rank 0 writes mp_rank_00's states
            save_training_checkpoint(
                self.engine, self.config, self.save, self.step, state, self.tokenizer, self.identity, self.protected
            )

    def flush(self) -> float:
        """Report the steps taken since the last report: their losses and norms reach the host together, so the
        host waits for the GPU once per log_interval (or save, evaluation), not once per step; each step's time is
        its CUDA events'. Returns the last loss."""
        if self.device is not None:
            torch.cuda.synchronize()
        pending, self.pending = self.pending, []
        seconds = self.timeline.seconds([p[-1] for p in pending])
        for (step, loss, lr, norm, wait, skipped, _), took in zip(pending, seconds):
            loss, norm = float(loss), float(norm) if norm is not None else None
            self.metrics.record(self.train_entry(step, loss, lr, norm, took, wait))
            self.check_finite(step, loss, norm, skipped)
        return loss

    def check_finite(self, step: int, loss: float, grad_norm: float | None, skipped: bool) -> None:
        """Stop after stop_after_nonfinite_steps optimizer steps in a row with a nan/inf loss or gradient norm;
        fp16 steps skipped while the loss scale backs off neither count nor break the row."""
        if skipped:
            return
        if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
            self.nonfinite = []
            return
        self.nonfinite.append(step)
        if len(self.nonfinite) >= self.config.training.stop_after_nonfinite_steps:
            latest = has_run(self.save) if self.save else None
            raise RunError(
                f"steps {self.nonfinite[0]}-{step}: loss {loss}, gradient norm {grad_norm}: "
                f"{len(self.nonfinite)} optimizer steps in a row were not finite; stopping without a "
                f"checkpoint (the latest stays {latest or 'none'}); lower lr, check the data, or resume "
                "from an earlier checkpoint"
            )

    def signalled_on_any_rank(self) -> bool:
        """Whether any rank was signalled: all ranks then save the same step and stop together. The flag goes
        through a CPU (gloo) group, so the check never waits for the GPU."""
        if self.world == 1:
            return self.stops.received is not None
        if self.flags is None:
            self.flags = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        flag = torch.tensor([1 if self.stops.received else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.flags)
        return bool(flag.item())

    def run(self) -> dict:
        """Train to train_iters (or exit_interval): evaluate, save and record on schedule; the results. A stop
        signal (received on any rank, since `train` started) saves after the current step, then stop_on_signal."""
        t = self.config.training
        results = {"start_step": self.step}
        if not self.resumed and t.saves_at(0):  # gpt-neox's step 0 checkpoint: the weights before any step
            self.checkpoint()
        if self.step == 0 and t.eval_interval:
            results["first_valid"] = self.record(self.evaluate("valid"))
        self.timeline, self.pending = Timeline(self.device is not None), []
        while self.step < t.train_iters:
            skipped = getattr(self.engine, "skipped_steps", 0)
            loss, lr, grad_norm = self.train_step()
            self.step += 1
            skipped = getattr(self.engine, "skipped_steps", 0) > skipped
            self.pending.append((self.step, loss, lr, grad_norm, self.data_wait, skipped, self.timeline.mark()))
            stop = bool(t.exit_interval) and self.step % t.exit_interval == 0
            signalled = self.signalled_on_any_rank()
            save = t.saves_at(self.step) or self.step == t.train_iters or stop
            evaluate = t.eval_interval and self.step % t.eval_interval == 0
            if save or signalled or evaluate or self.step % t.log_interval == 0:
                results["train_loss"] = self.flush()
            if save or signalled:
                self.checkpoint()
                self.timeline.restart()
            if signalled:
                self.stop_on_signal(evaluate)
            if evaluate:
                results["valid"] = self.record(self.evaluate("valid", self.step // t.eval_interval - 1))
                self.timeline.restart()
            if stop:
                break
        if self.step == t.train_iters:  # as gpt-neox: valid once more at the end (its last part), then test
            if t.eval_interval:
                final = self.evaluate("valid", t.train_iters // t.eval_interval)
                results["valid"] = self.record(final and {**final, "final": True})
            results["test"] = self.record(self.evaluate("test"))
        results["step"] = self.step
        self.reader.shutdown(wait=True, cancel_futures=True)
        self.metrics.close()
        if self.rank == 0 and self.metrics_dir is not None and (self.metrics_dir / "metrics.jsonl").is_file():
            m, t = self.config.model, self.config.training
            title = (
                f"{self.metrics_dir}: {m.num_layers} layers x {m.hidden_size}, {self.global_batch} x "
                f"{t.seq_length} tokens a step, {t.train_iters} steps"
            )
            results["plot"] = str(plot_losses(self.metrics_dir / "metrics.jsonl", self.metrics_dir / "loss.png", title))
        return results

    def stop_on_signal(self, evaluate: bool) -> None:
        """After a step saved on a stop signal: its evaluation if one is due (the resume starts after it), then
        Stopped, naming the checkpoint. After the last step the run ends as planned instead: a requeue would find
        nothing to train, and the final evaluation would never be made."""
        t, by = self.config.training, self.stops.received or "a signal to another rank"
        if self.step == t.train_iters:
            self.metrics.echo(
                f"{by} after the last step: step {self.step} is saved; the run ends with its final evaluation"
            )
            return
        if evaluate:
            self.record(self.evaluate("valid", self.step // t.eval_interval - 1))
        self.reader.shutdown(wait=True, cancel_futures=True)
        self.metrics.close()
        kept = f"checkpoint saved in {self.save}; resume with --load {self.save}" if self.save else "no --save"
        raise Stopped(f"stopped by {by} after step {self.step}: {kept}")

    def record(self, entry: dict | None) -> dict | None:
        """Record an evaluation's entry (None for a split without data) and return it."""
        if entry is not None:
            self.metrics.record(entry)
        return entry
