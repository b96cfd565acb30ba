"""gpt-neox's configs as its users write them: dashes, nested fp16 with type bfloat16, pipe-parallel-size 0,
checkpoint-factor, precision, several files merged left to right, and other architectures refused in one line."""

import dataclasses
import re
import warnings

import pytest
from helpers import ROOT, assert_clean_error

from trainer.config import ARCHITECTURE, ELSEWHERE, FIXED, FLAT, SWITCHES, ConfigError, build, load_config

NEOX_STYLE = """
{
  "pipe-parallel-size": 0,
  "model-parallel-size": 1,
  "num-layers": 2,
  "hidden-size": 64,
  "num-attention-heads": 4,
  "seq-length": 128,
  "max-position-embeddings": 128,
  "pos-emb": "rotary",
  "attention-config": [[["flash"], 2]],
  "fp16": {"enabled": true, "type": "bfloat16"},
  "optimizer": {"type": "Adam", "params": {"lr": 0.001, "betas": [0.9, 0.95], "eps": 1.0e-8}},
  "zero_optimization": {"stage": 1, "allgather_partitions": True, "overlap_comm": True,},
  "checkpoint-factor": 250,
}
"""


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_gpt_neox_style_config_loads_as_gpt_neox_reads_it(tmp_path):
    config = load_config(write(tmp_path, "neox.yml", NEOX_STYLE))
    assert config.precision.bf16 and not config.precision.fp16  # fp16: {type: bfloat16} is bf16
    assert config.optimizer.type == "Adam" and config.optimizer.lr == 0.001  # no key of one section in another
    assert config.parallel.pipe_parallel_size == 1  # 0: no pipeline, one stage
    assert config.training.save_interval == 250 and config.parallel.zero_stage == 1


def test_precision_spells_fp16_and_bf16(tmp_path):
    path = write(tmp_path, "neox.yml", NEOX_STYLE.replace('"fp16": {"enabled": true, "type": "bfloat16"},', ""))
    assert load_config(path, ["precision=bfloat16"]).precision.bf16
    assert load_config(path, ["precision=fp16"]).precision.fp16


def test_several_configs_merge_left_to_right_and_a_key_given_twice_is_an_error(tmp_path, run):
    base = write(tmp_path, "base.yml", NEOX_STYLE)
    local = write(tmp_path, "local.yml", "train_iters: 77\nsave: /tmp/nowhere\n")
    config = load_config([base, local])
    assert config.training.train_iters == 77 and config.model.num_layers == 2
    result = run("plan", "--config", base, "--config", local)
    assert result.exit_code == 0 and "layout" in result.output
    twice = write(tmp_path, "twice.yml", "num-layers: 4\n")
    with pytest.raises(ConfigError, match="num_layers already set by an earlier --config file"):
        load_config([base, twice])


@pytest.mark.parametrize(
    "extra,feature",
    [
        ('"moe_num_experts": 8,', "Mixture of Experts (8 experts)"),
        ('"attention_config": [[["local", "global"], 1]],', "local layers"),
        ('"attention_config": [[["mamba"], 2]],', "mamba layers"),
        ('"norm": "rmsnorm",', "norm: only 'layernorm' is supported"),
        ('"activation": "swiglu",', "activation: only 'gelu' is supported"),
        ('"use_bias_in_mlp": false,', "an MLP without biases"),
        ('"num_kv_heads": 2,', "grouped-query attention"),
        ('"te_columnparallel": true,', "transformer-engine"),
    ],
)
def test_another_architecture_is_refused_naming_the_feature(tmp_path, run, extra, feature):
    text = NEOX_STYLE.replace('"attention-config": [[["flash"], 2]],', "").replace("{\n", "{\n  " + extra + "\n", 1)
    result = run("plan", "--config", write(tmp_path, "other.yml", text))
    assert result.exit_code == 1
    assert_clean_error(result.output, feature)


CODE = "\n".join(p.read_text() for p in (ROOT / "trainer").rglob("*.py"))  # field definitions have no dot
READ_BY_NAME = {f"{split}_data_{kind}" for split in ("train", "valid", "test") for kind in ("paths", "weights")}


@pytest.mark.parametrize("key", sorted(FLAT))
def test_every_key_taken_into_the_config_is_read_by_the_trainer(key):
    """A key that lands in a field acts: the field is read outside the config (none is accepted and dropped)."""
    if key in READ_BY_NAME:  # batches.sources_from_keys reads them as f"{split}_data_paths" / "_weights"
        assert 'f"{split}_data_paths"' in CODE and 'f"{split}_data_weights"' in CODE
        return
    assert re.search(rf"\.{key}\b", CODE), f"{key} ({FLAT[key]}) is parsed but never read"


@pytest.mark.parametrize("key", sorted(FIXED))
def test_a_key_this_model_cannot_honour_is_refused_unless_it_has_gpt_neox_value(key):
    """Accepted with GPT-NeoX's value (gpt-neox's configs load); any other value is an error naming the key."""
    want = FIXED[key]
    if want is None or isinstance(want, bool):
        other = ["x"] if want is None else not want
    else:
        other = want + 0.5 if isinstance(want, (int, float)) else "other"
    build({"num_layers": 2, key: want})
    with pytest.raises(ConfigError, match=f"^{key}: only"):
        build({"num_layers": 2, key: other})


def test_every_switch_accepted_with_no_effect_is_named_in_the_readme():
    """The keys accepted with no effect are a decision the README states: each is listed there by name."""
    readme = (ROOT / "README.md").read_text()
    assert SWITCHES and not SWITCHES & ARCHITECTURE
    assert [key for key in sorted(SWITCHES) if f"`{key}`" not in readme] == []


def test_checkpoints_are_saved_on_gpt_neox_schedules(tmp_path):
    """checkpoint_factor linear or log and extra_save_iters, as gpt-neox's is_save_iter; a --set of one name of the
    save interval wins over the file's other name."""

    def saved(**keys):
        return [s for s in range(0, 1001) if build({"num_layers": 2, **keys}).training.saves_at(s)]

    assert saved(checkpoint_factor=250) == [250, 500, 750, 1000]
    assert saved(checkpoint_factor=2, checkpoint_scale="log") == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    pythia = saved(checkpoint_factor=1000, extra_save_iters=[0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
    assert pythia == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
    assert saved(save_interval=0) == []
    with pytest.raises(ConfigError, match="checkpoint_factor: a whole number"):
        build({"num_layers": 2, "checkpoint_factor": 1.5, "checkpoint_scale": "log"})
    with pytest.raises(ConfigError, match="checkpoint_scale: 'linear' or 'log'"):
        build({"num_layers": 2, "checkpoint_scale": "exponential"})
    file = write(tmp_path, "save.yml", "save_interval: 100\n")
    assert load_config(file, ["checkpoint_factor=7"]).training.save_interval == 7


def test_the_config_is_built_once_and_never_changed(tmp_path):
    config = load_config(write(tmp_path, "neox.yml", NEOX_STYLE), flags={"save": tmp_path / "run"}, device="cpu")
    assert config.paths.save == str(tmp_path / "run") and config.precision.bf16
    for section, field in (("training", "train_iters"), ("model", "num_layers"), ("paths", "save")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(getattr(config, section), field, 1)
    with pytest.warns(UserWarning, match="fp16 needs a GPU and DeepSpeed refuses it on CPU: training in fp32"):
        fp16 = load_config(write(tmp_path, "fp16.yml", "fp16: {enabled: true}\n"), device="cpu")
    assert not fp16.precision.fp16  # CPU: fp32, with a warning, decided where the config is built
    assert load_config(write(tmp_path, "gpu.yml", "fp16: {enabled: true}\n")).precision.fp16  # plan, dry run


def test_compile_with_bf16_on_a_cpu_trains_uncompiled_with_a_warning(tmp_path):
    """Inductor's C++ kernels of the model fail to build in bf16 (a traceback at the first step before this)."""
    path = write(tmp_path, "bf16.yml", "bf16: {enabled: true}\ncompile: true\n")
    with pytest.warns(UserWarning, match="training uncompiled here"):
        assert load_config(path, device="cpu").training.compile is False
    assert load_config(path, device="cuda").training.compile is True


def test_save_load_and_log_dirs_in_the_config_act(tmp_path):
    text = f"save: {tmp_path / 'a'}\nload: {tmp_path / 'a'}\nlog_dir: {tmp_path / 'logs'}\n"
    config = load_config(write(tmp_path, "paths.yml", text), flags={"save": str(tmp_path / "b"), "load": None})
    assert (config.paths.save, config.paths.load) == (str(tmp_path / "b"), str(tmp_path / "a"))  # flags win
    assert config.paths.log_dir == str(tmp_path / "logs")


@pytest.mark.parametrize("key", sorted(ELSEWHERE))
def test_a_reporting_destination_not_provided_is_ignored_with_a_warning_naming_it(key):
    """gpt-neox's local_setup_wandb.yml loads: its W&B keys change nothing in training and say so."""
    with pytest.warns(UserWarning, match=f"^{key}: ignored"):
        build({"num_layers": 2, key: True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build({"num_layers": 2, key: False})  # unset: nothing to say


FP16 = """
fp16:
  enabled: true
  loss_scale: 0
  initial_scale_power: 16
  loss_scale_window: 500
  hysteresis: 3
  min_loss_scale: 2
gradient_clipping: 0.7
"""


def test_the_deepspeed_config_of_an_fp16_run_on_a_gpu_carries_every_loss_scaling_key(tmp_path):
    """What DeepSpeed is given for an fp16 run on CUDA, built on this CPU: each loss-scaling key and the clipping
    equal the YAML's (every value distinct, so two keys swapped show)."""
    from trainer.engine import deepspeed_config

    path = write(tmp_path, "neox.yml", NEOX_STYLE.replace('"fp16": {"enabled": true, "type": "bfloat16"},', ""))
    extra = write(tmp_path, "fp16.yml", FP16)
    config = load_config([path, extra], device="cuda")
    built = deepspeed_config(config, world_size=1)
    assert built["fp16"] == {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 16,
        "loss_scale_window": 500,
        "hysteresis": 3,
        "min_loss_scale": 2,
    }
    assert built["gradient_clipping"] == 0.7 and "bf16" not in built
