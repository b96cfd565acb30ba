"""gpt-neox's configs as its users write them: dashes, nested fp16 with type bfloat16, pipe-parallel-size 0,
checkpoint-factor, precision, several files merged left to right, and other architectures refused in one line."""

import pytest
from helpers import assert_clean_error

from trainer.config import ConfigError, load_config

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
