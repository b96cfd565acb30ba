"""gpt-neox's YAML keys as its users write them: read, flattened, type-checked, and refused where this GPT-NeoX
cannot honour them. trainer/config.py builds the typed config from them, once."""

import difflib
import types
import typing
from pathlib import Path

import yaml

from pile_tools.ground import InputError


class ConfigError(InputError):
    """A config that cannot be used; the message names the key."""


class RunError(InputError):
    """A run that cannot go on (non-finite losses, a bad token id in a shard); the message says where."""


# Kernel, memory-layout, communication and logging switches of gpt-neox: accepted so its configs load, with no
# effect on what is computed (this implementation's kernels, memory layout and logs are its own: README).
SWITCHES = {
    "scaled_upper_triang_masked_softmax_fusion",
    "rope_fusion",
    "partition_activations",
    "layernorm_fusion",
    "synchronize_each_layer",
    "sparsity_config",
    "gradient_predivide_factor",
    "steps_per_print",
    "wall_clock_breakdown",
    "distributed_backend",
    "contiguous_checkpointing",
    "zero_allow_untested_optimizer",
    "attention_softmax_in_fp32",
    "apply_query_key_layer_scaling",
    "num_workers",  # the data loader's processes: the trainer reads the next batch in a thread of its own
    "auto_cast",  # DeepSpeed's fp16 casting of the inputs: the trainer casts for its precision itself
    "fp32_allreduce",  # gpt-neox: the norms' gradients under sequence parallelism in fp32 (no sequence parallel here)
    "log_grad_norm",  # every logged step has its gradient norm here
}
# Architecture keys: accepted when they describe a dense GPT-NeoX, refused otherwise (refuse_other_architectures).
ARCHITECTURE = {
    "moe_num_experts",
    "num_kv_heads",
    "attention_config",
    "use_bias_in_norms",
    "use_bias_in_attn_linear",
    "use_bias_in_mlp",
}
# gpt-neox keys accepted only with the value this implementation computes (GPT-NeoX's); another is refused.
FIXED = {
    "pos_emb": "rotary",
    "norm": "layernorm",
    "no_weight_tying": True,
    "activation": "gelu",
    "hidden_dropout": 0,
    "attention_dropout": 0,
    "checkpoint_num_layers": 1,
    "output_layer_parallelism": "column",
    "data_impl": "mmap",
}
WHY_FIXED = {
    "hidden_dropout": "no dropout here (GPT-NeoX-20B and Pythia train without it)",
    "attention_dropout": "no dropout here (GPT-NeoX-20B and Pythia train without it)",
    "checkpoint_num_layers": "activation checkpointing keeps each block's input (1)",
    "data_impl": "shards are Megatron's mmap format",
}
# gpt-neox's destinations for what a run reports, not provided here: a run that sets one is told, in one warning
# line, where its metrics go instead (its training is the same).
ELSEWHERE = {
    "use_wandb": "no Weights & Biases here: metrics go to metrics.jsonl and TensorBoard",
    "wandb_project": "no Weights & Biases here: metrics go to metrics.jsonl and TensorBoard",
    "wandb_group": "no Weights & Biases here: metrics go to metrics.jsonl and TensorBoard",
    "wandb_host": "no Weights & Biases here: metrics go to metrics.jsonl and TensorBoard",
    "eval_tasks": "no evaluation during training here: run neox-data evaluate on a checkpoint",
    "merge_file": "GPT-2 BPE's merges: checkpoints ship a tokenizer.json, HFTokenizer's vocab_file or the shards'",
    "checkpoint_validation_with_forward_pass": "every checkpoint carries checksums, verified before it loads",
}


def check_type(key: str, value, annotation):
    """`value` as `annotation` wants it, or a ConfigError naming `key`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options[:-1]:  # the first that takes the value; the last one's error names the key
            try:
                return check_type(key, value, option)
            except ConfigError:
                pass
        return check_type(key, value, options[-1])
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [check_type(key, v, args[0]) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(check_type(key, v, a) for v, a in zip(value, args))
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(annotation, True)
    if not ok:
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    return float(value) if annotation is float else value


def flatten(raw: dict) -> dict:
    """gpt-neox's nested keys (optimizer, fp16, bf16, zero_optimization) as flat ones; '-' read as '_'."""
    flat = {}
    for key, value in raw.items():
        key = key.replace("-", "_")
        if key == "optimizer" and isinstance(value, dict):
            flat["type"] = value.get("type", "Adam")
            for k, v in (value.get("params") or {}).items():
                flat[k] = v
        elif key in ("fp16", "bf16") and isinstance(value, dict):
            # gpt-neox's Pythia configs spell bf16 as fp16: {enabled: true, type: bfloat16}
            name = "bf16" if str(value.get("type", "")).lower() in ("bfloat16", "bf16") else key
            flat[name] = value.get("enabled", True)
            for k, v in value.items():
                if k not in ("enabled", "type"):
                    flat[k] = v
        elif key == "zero_optimization" and isinstance(value, dict):
            flat["zero_stage"] = value.get("stage", 0)
        elif key in ("optimizer", "zero_optimization"):
            raise ConfigError(f"{key}: expected a mapping like {key}: {{...}}, got {value!r}")
        elif key == "checkpoint_factor":  # gpt-neox's current name for save_interval
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            elif isinstance(value, float):
                raise ConfigError(f"checkpoint_factor: a whole number of steps here, got {value}")
            flat.setdefault("save_interval", value)
        elif key == "precision":  # gpt-neox's other spelling of fp16/bf16
            if value not in ("fp16", "bfloat16", "fp32", None):
                raise ConfigError(f"precision: {value!r}; choose fp16, bfloat16 or fp32")
            flat.setdefault("fp16", value == "fp16")
            flat.setdefault("bf16", value == "bfloat16")
        else:
            flat[key] = value
    return flat


DENSE = {"global", "flash"}  # gpt-neox's attention types that compute dense causal attention (flash: its kernel)


def attention_types(value) -> set[str]:
    """The layer types of gpt-neox's attention_config: [[["global"], 24]], [[["local", "global"], 12]], ..."""
    try:
        return {t for types, _ in value for t in ([types] if isinstance(types, str) else types)}
    except (TypeError, ValueError):
        raise ConfigError(f"attention_config: expected [[[types...], layers], ...], got {value!r}") from None


def refuse_other_architectures(flat: dict) -> None:
    """A config of a model this GPT-NeoX is not (MoE, sparse or state-space layers, no biases, transformer-engine,
    grouped-query attention) is an error naming the feature, never trained as a dense GPT-NeoX."""
    refusals = {
        "moe_num_experts": lambda v: (v or 1) > 1 and f"Mixture of Experts ({v} experts)",
        "attention_config": lambda v: (
            (other := sorted(attention_types(v) - DENSE)) and f"{', '.join(other)} layers (only dense attention here)"
        ),
        "num_kv_heads": lambda v: v and v != flat.get("num_attention_heads") and "grouped-query attention",
        "use_bias_in_norms": lambda v: v is False and "norms without biases",
        "use_bias_in_attn_linear": lambda v: v is False and "attention without biases",
        "use_bias_in_mlp": lambda v: v is False and "an MLP without biases",
    }
    for key, rule in refusals.items():
        if key in flat and (feature := rule(flat[key])):
            raise ConfigError(f"{key}: {feature} is not GPT-NeoX; this toolkit trains the GPT-NeoX architecture only")
    engine = sorted(k for k, v in flat.items() if k.startswith("te_") and v)
    if engine:
        raise ConfigError(f"{engine[0]}: transformer-engine layers are not supported (GPT-NeoX's own layers only)")


def accepted(key: str, value) -> bool:
    """A FIXED key's value is GPT-NeoX's."""
    return value == FIXED[key]


NESTED = {"optimizer", "fp16", "bf16", "zero_optimization"}  # gpt-neox's mappings, flattened by flatten()


def parse_override(item: str, known: set[str]) -> tuple[str, object]:
    """KEY=VALUE from --set; the value is read as YAML, so numbers, booleans and lists keep their type."""
    key, sep, value = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if key not in known:  # a typo on the command line is the user's: stop, unlike a gpt-neox file's extra keys
        close = difflib.get_close_matches(key, sorted(known), n=1)
        raise ConfigError(f"--set {key}: unknown key" + (f"; did you mean {close[0]}?" if close else ""))
    return key, parsed


SAME_AS = {"checkpoint_factor": "save_interval", "save_interval": "checkpoint_factor"}  # two names, one setting


def apply_overrides(raw: dict, overrides: list[str], known: set[str]) -> dict:
    """The file's keys with --set's on top; replacing one of gpt-neox's mappings needs a mapping."""
    for key, value in (parse_override(item, known) for item in overrides):
        if key in NESTED and not isinstance(value, dict) and not (key in ("fp16", "bf16") and isinstance(value, bool)):
            raise ConfigError(
                f"--set {key}={value!r}: {key} is a mapping (like {key}: {{...}}); set one of its "
                f"keys instead, e.g. --set lr=... for the optimizer"
            )
        raw.pop(SAME_AS.get(key), None)  # the other name of the same setting: --set wins over the file's
        raw[key] = value
    return raw


def read_config_file(path: str | Path) -> dict:
    """A YAML config as a dict with '-' read as '_', or a ConfigError naming the file."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        why = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{line} ({why})") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a directory, not a config file") from None
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise ConfigError(f"{path}: a config is a mapping of keys to values")
    return {k.replace("-", "_"): v for k, v in raw.items()}
