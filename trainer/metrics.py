"""What a run reports: metrics.jsonl (one JSON object per step and per evaluation), TensorBoard event files, a
line per log_interval, and the loss-curve PNG drawn from metrics.jsonl. Rank 0 writes; the others stay quiet.

metrics.jsonl lines: {"kind": "train", "step", "loss", "lr", "loss_scale", "grad_norm", "tokens_per_s",
"tflops_per_gpu", "mfu", "hfu", "consumed_samples", "data_wait_s", "peak_memory_gib", "elapsed_s"} and {"kind":
"valid" | "test", "step", "part", "loss", "ppl", "components": {shard: loss}}: as in gpt-neox, each evaluation
reads the next `part` of valid (eval_iters global batches), and valid is evaluated once more after the last step
("final": true; so twice at the last step when it is a multiple of eval_interval), then test. MFU counts the
model's FLOPs, HFU also the recomputed forward passes of activation checkpointing (both None without a known
GPU peak). On resume the lines past the checkpoint's step are dropped (atomically).
"""

import json
import math
import resource
import time
from pathlib import Path

import click

from pile_tools.ground import save_figure, write_text, writing

# Dense bf16/fp16 tensor-core peak, FLOP/s, by device name (for MFU).
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "A10": 125e12,
    "L40": 181e12,
    "V100": 125e12,
    "B200": 2250e12,
    "GH200": 989e12,
}


def peak_memory_gib(device) -> float:
    """The most memory this process has held: the CUDA allocator's peak, or on a CPU the peak resident set."""
    if device is not None:
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def peak_flops(device_name: str) -> float | None:
    """The dense bf16/fp16 peak of a GPU by its name (for MFU), or None when unknown."""
    matches = [k for k in PEAK_FLOPS if k in device_name]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


def step_of_line(line: str) -> int | None:
    """The step of a metrics.jsonl line, or None for a line cut short."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut short by a crash or a full disk
        return None
    return step if type(step) is int else None  # a line edited by hand is no step's record


def truncate_after(path: Path, step: int) -> None:
    """Keep the lines of steps <= `step` (a resumed run rewrites what came after; a run from step 0, all)."""
    if not path.is_file():
        return
    steps = [(line, step_of_line(line)) for line in path.read_text().splitlines()] if step > 0 else []
    kept = [line for line, s in steps if s is not None and s <= step]
    write_text(path, "".join(line + "\n" for line in kept))


class Metrics:
    """Rank 0's reporting: metrics.jsonl, TensorBoard events, a log line every log_interval and a progress bar."""

    def __init__(
        self,
        directory: Path | None,
        tensorboard_dir: str | None,
        log_interval: int,
        total_steps: int,
        start_step: int,
        rank: int,
    ):
        self.rank, self.log_interval = rank, log_interval
        self.file = self.writer = self.bar = None
        if rank != 0:
            return
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            truncate_after(directory / "metrics.jsonl", start_step)
            self.file = open(directory / "metrics.jsonl", "a")
        if directory is not None or tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                events = tensorboard_dir or directory / "tensorboard"
                self.writer = SummaryWriter(str(events), purge_step=start_step + 1)
            except ImportError:  # tensorboard is optional
                self.writer = None
        if click.get_text_stream("stderr").isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False)

    def record(self, entry: dict) -> None:
        """Append an entry to metrics.jsonl (and TensorBoard), and print it at log steps."""
        if self.rank != 0:
            return
        if self.file:
            with writing(Path(self.file.name)):
                self.file.write(json.dumps(entry) + "\n")
                self.file.flush()
        if self.writer:
            prefix = entry["kind"]
            for key, value in entry.items():
                if isinstance(value, (int, float)) and key not in ("step", "kind"):
                    self.writer.add_scalar(f"{prefix}/{key}", value, entry["step"])
        if entry["kind"] == "train":
            if self.bar:
                self.bar.update(1)
                self.bar.set_postfix(loss=f"{entry['loss']:.4f}")
            if entry["step"] % self.log_interval == 0:
                self.echo(describe(entry))
        else:
            final = "  (final: the next valid part, as gpt-neox)" if entry.get("final") else ""
            ppl = perplexity(entry["ppl"])
            self.echo(f"{entry['kind']:5} step {entry['step']:>7}  loss {entry['loss']:.4f}  ppl {ppl}{final}")

    def echo(self, line: str) -> None:
        """A line on the terminal, above the progress bar (rank 0 only)."""
        if self.rank == 0:
            (self.bar.write if self.bar else click.echo)(line)

    def close(self) -> None:
        """Close the progress bar, metrics.jsonl and the TensorBoard writer."""
        for thing in (self.bar, self.file, self.writer):
            if thing is not None:
                thing.close()


def perplexity(ppl: float) -> str:
    """A perplexity to five significant digits, the precision of the loss printed beside it (more would print float32
    noise: the loss's last bit moves exp(11) by 0.06, and CPUs differ in that bit)."""
    if not math.isfinite(ppl):
        return str(ppl)
    return f"{ppl:.{max(0, 4 - math.floor(math.log10(max(ppl, 1.0))))}f}"


def describe(e: dict) -> str:
    """A train entry as the log line shows it."""
    line = (
        f"step {e['step']:>7}  loss {e['loss']:.4f}  lr {e['lr']:.3e}  scale {e['loss_scale']:g}  "
        f"grad norm {e['grad_norm'] if e['grad_norm'] is not None else float('nan'):.3f}  "
        f"{e['tokens_per_s']:,.0f} tok/s"
    )
    if e.get("tflops_per_gpu") is not None:
        line += f"  {e['tflops_per_gpu']:.1f} TFLOPS/GPU"
    if e.get("mfu") is not None:
        line += f"  MFU {e['mfu']:.1%}"
    return line


def read_metrics(path: Path) -> list[dict]:
    """The entries of a metrics.jsonl."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def plot_losses(metrics_path: Path, png: Path, title: str = "") -> Path:
    """Training loss (and validation loss, if any) against step, from metrics.jsonl, titled with the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, style in (("train", "-"), ("valid", "o-")):
        points = [(r["step"], r["loss"]) for r in rows if r["kind"] == kind]
        if points:
            ax.plot(*zip(*points), style, label=kind, markersize=4)
    ax.set_title(title or str(metrics_path.parent), fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, png)


class Timeline:
    """Step times without waiting for the GPU at each step: a CUDA event recorded at the end of each step (the
    clock on a CPU, where every step ends before the next starts), read when the steps are reported."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.last = self.mark()

    def mark(self):
        """A point of the run's timeline, now."""
        if not self.cuda:
            return time.perf_counter()
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def restart(self) -> None:
        """Start the next step's time now (after an evaluation or a save, which no step's time counts)."""
        self.last = self.mark()

    def seconds(self, marks: list) -> list[float]:
        """The time of each step ending at `marks` (in order, after the GPU has reached the last one)."""
        out = []
        for mark in marks:
            out.append(self.last.elapsed_time(mark) / 1000 if self.cuda else mark - self.last)
            self.last = mark
        return out
