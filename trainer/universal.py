"""Checkpoints that another layout resumes with its optimizer: each parameter's fp32 value, Adam's two moments and
the step, saved with torch.distributed.checkpoint (DCP) under the parameter's full name, one DCP directory per
pipeline part (`SAVE/global_stepN/universal/gpt_neox.layers.3/`).

A TP-split parameter is saved as a DTensor sharded along the dimension `tensor_parallel.partition_dim` names, over
its TP peers, so DCP knows where each rank's piece lies in the whole; replicated ones (every DP peer, LayerNorms
on every TP rank) are written once. A run of any TP x PP x DP asks DCP for its own pieces, and DCP reads the parts
of the files that overlap them: the resharding is DCP's. One directory per part keeps the fp32 copies a rank makes
(ZeRO and bf16 keep the masters and moments in flat partitions) to one layer at a time, and each is saved and
loaded by the ranks that hold that part: its pipeline stage.

Read and written through DeepSpeed's own accessors where its optimizer has them (`safe_get_full_fp32_param`,
`safe_get_full_optimizer_state` and their setters: ZeRO 1/2, and bf16 with a pipeline), else as the torch
optimizer's own tensors: each parameter and its state when DeepSpeed steps it directly (fp32 without ZeRO), or the
fp32 copy DeepSpeed keeps of each parameter and its state (fp16/bf16 without ZeRO: its unfused optimizer, as
AdamW is not DeepSpeed's FusedAdam).
"""

import functools
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import NeoXConfig
from trainer.data_only import dcp_load
from trainer.layout import pipeline_parts
from trainer.tensor_parallel import partition_dim

UNIVERSAL = "universal"
MOMENTS = ("exp_avg", "exp_avg_sq")


def full_names(module: nn.Module, config: NeoXConfig) -> dict[str, nn.Parameter]:
    """This rank's parameters by their full model name (`gpt_neox.layers.3.attention.dense.weight`)."""
    if not config.parallel.pipelined:
        return dict(module.named_parameters())
    paths = [path for _, path in pipeline_parts(config.model.num_layers)]
    out = {}
    for key, param in module.named_parameters():  # a PipelineModule names its layers by their global index
        layer, _, rest = key.partition(".")
        out[f"{paths[int(layer)]}.{rest}"] = param
    return out


def by_part(names: dict[str, nn.Parameter], num_layers: int) -> dict[str, dict[str, nn.Parameter]]:
    """The parameters grouped by pipeline part (the longest path that prefixes the name), in pipeline order."""
    paths = [path for _, path in pipeline_parts(num_layers)]
    out: dict[str, dict[str, nn.Parameter]] = {}
    for name, param in names.items():
        part = max((p for p in paths if name.startswith(p + ".")), key=len)
        out.setdefault(part, {})[name] = param
    return {p: out[p] for p in paths if p in out}


@functools.cache
def stage_groups(pp: int, dp: int, tp: int) -> list:
    """The process group of each pipeline stage's ranks (ranks are laid out pipe, data, model); every rank
    creates every stage's group, in the same order (torch's rule for new groups)."""
    if pp == 1:
        return [dist.group.WORLD]
    return [dist.new_group([s * dp * tp + r for r in range(dp * tp)]) for s in range(pp)]


@functools.cache
def tp_mesh(tp: int, device_type: str, group):
    """The DeviceMesh of this rank's TP peers (a DTensor's placement is relative to it)."""
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(group, device_type)


class Universal:
    """One rank's view of its run for universal checkpoints: its parameters by part, its group, and where the
    fp32 value and moments of each parameter live in the optimizer."""

    def __init__(self, engine, config: NeoXConfig):
        p = config.parallel
        self.engine, self.tp = engine, p.model_parallel_size
        self.optimizer = engine.optimizer
        self.parts = by_part(full_names(engine.module, config), config.model.num_layers)
        world = dist.get_world_size()
        pp, dp = p.pipe_parallel_size, world // (p.pipe_parallel_size * self.tp)
        self.group = stage_groups(pp, dp, self.tp)[dist.get_rank() // (dp * self.tp)]
        params = [param for part in self.parts.values() for param in part.values()]
        if all(hasattr(q, "_hp_mapping") for q in params):
            self.kind = "mapped"  # ZeRO 1/2, bf16 with a pipeline: DeepSpeed's per-parameter accessors
        elif hasattr(self.optimizer, "fp32_groups") and hasattr(self.optimizer, "fp16_groups"):
            self.kind = "copies"  # fp16/bf16 without ZeRO (DeepSpeed's unfused optimizer): a fp32 copy of each
        else:
            self.kind = "plain"  # fp32 without ZeRO: DeepSpeed steps the torch optimizer itself
        self.mesh = None
        if self.tp > 1:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.mesh = tp_mesh(self.tp, device, engine.grid.get_slice_parallel_group())

    def global_view(self, name: str, local: torch.Tensor):
        """`local` as a piece of the full tensor: a DTensor for a TP-split parameter, else the tensor itself."""
        dim = partition_dim(name)
        if self.mesh is None or dim is None:
            return local
        from torch.distributed.tensor import DTensor, Shard

        return DTensor.from_local(local, self.mesh, [Shard(dim)], run_check=False)

    def step(self) -> int:
        """The torch optimizer's step count (Adam's bias correction reads it; 0 before the first step)."""
        steps = [int(s["step"]) for s in innermost(self.optimizer).state.values() if "step" in s]
        return steps[0] if steps else 0

    def views(self) -> dict[nn.Parameter, dict[str, torch.Tensor]]:
        """Each parameter's fp32 value and moments: the optimizer's own tensors (not "mapped")."""
        inner = innermost(self.optimizer)
        ensure_states(inner)
        if self.kind == "plain":
            masters = {q: q for q in inner.state}
        else:  # a fp32 copy of each fp16/bf16 parameter, group by group, stepped by the torch optimizer
            pairs = zip(self.optimizer.fp16_groups, self.optimizer.fp32_groups)
            masters = {q: m for low, high in pairs for q, m in zip(low, high)}
        return {q: {"value": m, **{k: inner.state[m][k] for k in MOMENTS}} for q, m in masters.items()}

    def ready(self) -> dict | None:
        """Once per save or load: link DeepSpeed's per-parameter mappings ("mapped": None), else the views."""
        if self.kind == "mapped":
            link_states(self.optimizer)
            return None
        return self.views()

    def read(self, params: dict[str, nn.Parameter], views: dict | None) -> dict[str, dict[str, torch.Tensor]]:
        """The fp32 value and moments of each parameter by name (this rank's TP piece, whole across DP)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if views is None:  # DP peers assemble each tensor from their partitions: the same order on all
            get = safe_get_full_optimizer_state
            return {
                name: {"value": safe_get_full_fp32_param(q), **{k: get(q, k) for k in MOMENTS}}
                for name, q in params.items()
            }
        return {name: views[q] for name, q in params.items()}

    def state_dict(self, params: dict[str, nn.Parameter], fill: bool, views: dict | None = None) -> dict:
        """One part's DCP state dict: `name`, `name.exp_avg`, `name.exp_avg_sq` and `step`; `fill` reads the
        values (`views`: what ready() returned), else the tensors are empty, to be loaded into."""
        out = {"step": torch.tensor(self.step() if fill else 0, dtype=torch.int64)}
        values = self.read(params, views) if fill else {}
        for name, q in params.items():
            empty = {} if fill else {k: torch.empty(q.shape, device=q.device) for k in ("value", *MOMENTS)}
            for key, tensor in (values.get(name) or empty).items():
                out[name if key == "value" else f"{name}.{key}"] = self.global_view(name, tensor.detach())
        return out

    def save(self, where: Path) -> None:
        """Write every part this rank holds to `where`/<part>/ (collective over each stage's ranks)."""
        import torch.distributed.checkpoint as dcp

        views = self.ready()
        for part, params in self.parts.items():
            sd = self.state_dict(params, fill=True, views=views)
            dcp.save(sd, checkpoint_id=where / part, process_group=self.group)

    def load(self, where: Path) -> int:
        """Read this rank's pieces of every part from `where` into the weights and the optimizer; returns the step."""
        step, loaded = 0, {}
        for part, params in self.parts.items():
            sd = self.state_dict(params, fill=False)
            dcp_load(sd, where / part, self.group)
            step = int(sd.pop("step"))
            for name, q in params.items():
                local = {k: sd[name if k == "value" else f"{name}.{k}"] for k in ("value", *MOMENTS)}
                loaded[q] = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in local.items()}
        with torch.no_grad():
            self.write(loaded)
        set_steps(self.optimizer, step)
        return step

    def write(self, loaded: dict[nn.Parameter, dict[str, torch.Tensor]]) -> None:
        """Put loaded values and moments into the optimizer's tensors, and the values into the weights."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        views = self.ready()
        if views is None:
            for q, values in loaded.items():
                safe_set_full_fp32_param(q, values["value"])
                for k in MOMENTS:
                    safe_set_full_optimizer_state(q, values[k], k)
            self.optimizer.update_lp_params()
            return
        for q, values in loaded.items():
            for k, tensor in values.items():
                views[q][k].copy_(tensor)
            q.copy_(views[q]["value"])  # the fp16/bf16 weights follow their copies ("plain": the same tensor)


def innermost(optimizer):
    """The torch optimizer inside DeepSpeed's fp16/bf16/ZeRO wrappers."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def ensure_states(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter Adam's state (zero moments, step 0) where it has none yet: a run that has not
    stepped, about to be loaded into. Through load_state_dict, which puts each on the device torch expects."""
    params = [q for g in optimizer.param_groups for q in g["params"]]
    if all(optimizer.state.get(q) for q in params):
        return
    state = optimizer.state_dict()
    for i, q in enumerate(params):
        if not optimizer.state.get(q):
            zeros = torch.zeros_like(q, memory_format=torch.preserve_format)
            state["state"][i] = {"step": torch.tensor(0.0), "exp_avg": zeros, "exp_avg_sq": zeros.clone()}
    optimizer.load_state_dict(state)


def link_states(optimizer) -> None:
    """Point each parameter's DeepSpeed mapping at its share of Adam's state. DeepSpeed (0.19.8) links them once,
    after the first parameter group's first step, when the other groups have no state yet, so the no-decay
    group's parameters would show none; and a run that has not stepped has none at all."""
    ensure_states(innermost(optimizer))
    optimizer._hp_optimizer_states_linked = False
    optimizer._lazy_init_hp_params_optimizer_state()


def set_steps(optimizer, step: int) -> None:
    """Set the step count of every state of the torch optimizer inside DeepSpeed's wrappers."""
    for state in innermost(optimizer).state.values():
        if torch.is_tensor(state.get("step")):
            state["step"].fill_(step)
        elif "step" in state:
            state["step"] = step


def save_universal(engine, config: NeoXConfig, where: Path) -> None:
    """Write the universal copy of this rank's part of the run into `where`/universal."""
    Universal(engine, config).save(where / UNIVERSAL)


def load_universal(engine, config: NeoXConfig, where: Path) -> int:
    """Read the weights, Adam's moments and the step of `where`/universal into this rank's engine."""
    return Universal(engine, config).load(where / UNIVERSAL)
