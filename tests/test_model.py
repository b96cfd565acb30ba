"""The model against transformers' GPT-NeoX: logits, conversion both ways, generation, init, configs, plan."""

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_clean_error, unconstant
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import GPTNeoXForCausalLM

import trainer.model as model_module
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.config import ConfigError, NeoXConfig, build, load_config
from trainer.generate import generate
from trainer.hf import export_hf, hf_config, import_hf
from trainer.model import GPTNeoX, ModelConfig, checkpoint_blocks, lm_loss
from trainer.plan import count_parameters

VARIANTS = [(parallel, pct) for parallel in (True, False) for pct in (0.25, 1.0)]


def tiny(parallel=True, rotary_pct=0.25, **kw) -> ModelConfig:
    return ModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=300,
        max_position_embeddings=64,
        rotary_pct=rotary_pct,
        gpt_j_residual=parallel,
        make_vocab_size_divisible_by=8,
        **kw,
    )


def random_ids(vocab, n=2, s=24, seed=0):
    return torch.randint(0, vocab, (n, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("parallel,rotary_pct", VARIANTS)
def test_export_gives_equal_logits_in_transformers(tmp_path, parallel, rotary_pct):
    torch.manual_seed(0)
    config = tiny(parallel, rotary_pct)
    ours = unconstant(GPTNeoX(config), seed=3).eval()
    save_checkpoint(ours, NeoXConfig(model=config), tmp_path / "ckpt", tokenizer=None)
    export_hf(tmp_path / "ckpt", tmp_path / "hf", tokenizer="gpt-neox-20b")
    theirs = GPTNeoXForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = random_ids(config.vocab_size)
    with torch.no_grad():
        assert torch.allclose(ours(ids), theirs(ids).logits, atol=1e-5, rtol=0)
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["hidden_act"] == "gelu_pytorch_tanh" and saved["use_parallel_residual"] is parallel


@pytest.mark.parametrize("parallel,rotary_pct", VARIANTS)
def test_import_gives_equal_logits_and_generation(tmp_path, parallel, rotary_pct):
    torch.manual_seed(1)
    theirs = unconstant(GPTNeoXForCausalLM(hf_config(tiny(parallel, rotary_pct))), seed=4).eval()
    theirs.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    ours, _ = load_checkpoint(tmp_path / "ckpt")
    ours.eval()
    ids = random_ids(ours.config.padded_vocab_size, seed=2)
    with torch.no_grad():
        assert torch.allclose(ours(ids), theirs(ids).logits, atol=1e-5, rtol=0)
    prompt = ids[0, :7].tolist()
    expected = theirs.generate(
        torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=12
    )[0, 7:].tolist()
    assert generate(ours, prompt, 12, use_cache=True) == expected
    assert generate(ours, prompt, 12, use_cache=False) == expected


def test_init_follows_small_init_and_wang_init():
    config = ModelConfig(num_layers=4, hidden_size=1024, num_attention_heads=16, vocab_size=8192)
    model = GPTNeoX(config)
    small, wang = math.sqrt(2 / (5 * 1024)), 2 / (4 * math.sqrt(1024))
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert p.abs().max() == 0, name
        elif "layernorm" in name or "layer_norm" in name:
            assert torch.all(p == 1), name
        else:
            want = wang if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")) else small
            assert p.std().item() == pytest.approx(want, rel=0.02), name
            assert p.mean().abs().item() < want * 0.05, name


def test_plan_of_the_paper_config(run):
    result = json.loads(run.ok("plan", "--config", "configs/20B.yml", "--json").output)
    assert result["parameters"] == 20_554_567_680 and result["padded_vocab_size"] == 50_432
    full = json.loads(run.ok("plan", "--config", "configs/20B.yml", "--gpus", 96, "--json").output)
    assert full["layout"]["data_parallel"] == 12 and full["blocks_per_stage"] == [11, 11, 11, 11]
    assert full["tokens_per_step"] == 1536 * 2048 and round(full["total_tokens"] / 1e9) == 472


@pytest.mark.parametrize("name", ["tiny", "pythia-70M", "pythia-160M", "pythia-410M", "pythia-1.4B", "20B"])
def test_preset_parameter_counts_match_transformers(name):
    config = load_config(f"configs/{name}.yml")
    with torch.device("meta"):
        hf = GPTNeoXForCausalLM(hf_config(config.model))
    assert count_parameters(config)[0] == sum(p.numel() for p in hf.parameters())


def test_pythia_70m_is_70m():
    total, non_embedding = count_parameters(load_config("configs/pythia-70M.yml"))
    assert total == 70_426_624 and non_embedding == 18_915_328  # Pythia-70M's published counts


@pytest.mark.filterwarnings("ignore:unknown config keys")
def test_unknown_keys_warn_once_and_wrong_types_name_the_key():
    raw = {
        "num-layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "fancy_new_thing": 1,
        "another_one": "x",
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "betas": [0.9, 0.99], "eps": 1e-8}},
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = build(raw)
    assert len(caught) == 1 and "another_one, fancy_new_thing" in str(caught[0].message)
    assert config.model.num_layers == 2 and config.optimizer.betas == (0.9, 0.99)
    for key, value in (("hidden_size", "big"), ("gpt_j_residual", 1), ("optimizer", {"params": {"lr": "fast"}})):
        with pytest.raises(ConfigError, match=key if key != "optimizer" else "lr"):
            build({**raw, key: value})
    with pytest.raises(ConfigError, match="model_parallel_size"):
        build({**raw, "model_parallel_size": 3})
    with pytest.raises(ConfigError, match="pos_emb"):
        build({**raw, "pos_emb": "learned"})


def test_generate_cli_and_bad_input(tmp_path, run):
    torch.manual_seed(0)
    config = load_config("configs/tiny.yml")
    save_checkpoint(
        GPTNeoX(config.model), config, tmp_path / "ckpt", tokenizer="tokenizer/assets/gpt-neox-20b/tokenizer.json"
    )
    out = json.loads(
        run.ok(
            "generate", tmp_path / "ckpt", "--prompt", "Hello world", "--max-new-tokens", 5, "--greedy", "--json"
        ).output
    )
    assert out["prompt_ids"] == [12092, 1533] and len(out["generated_ids"]) <= 5
    again = json.loads(
        run.ok(
            "generate", tmp_path / "ckpt", "--prompt-ids", "12092,1533", "--max-new-tokens", 5, "--greedy", "--json"
        ).output
    )
    assert again["generated_ids"] == out["generated_ids"]
    assert run("generate", tmp_path / "ckpt").exit_code == 2
    bad = run("generate", tmp_path / "ckpt", "--prompt-ids", "a,b")
    assert bad.exit_code == 1
    assert_clean_error(bad.output, "comma-separated integers")
    run.ok("export-hf", tmp_path / "ckpt", "--output", tmp_path / "hf")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("Hello world")["input_ids"] == [12092, 1533]


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    plain = GPTNeoX(tiny())
    checkpointed = checkpoint_blocks(GPTNeoX(tiny()))
    checkpointed.load_state_dict(plain.state_dict())
    ids = random_ids(300)
    for model in (plain, checkpointed):
        logits = model.train()(ids)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


class LargestFloat32(TorchDispatchMode):
    """Records the largest float32 tensor any operation creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def test_the_loss_never_holds_fp32_logits_of_the_whole_batch(monkeypatch):
    """Chunked cross-entropy: the plain loss to 1e-6, the same gradients, and no fp32 batch x seq x vocab tensor,
    forward or backward (the chunks are recomputed in the backward pass)."""
    monkeypatch.setattr(model_module, "LOSS_CHUNK_TOKENS", 64)
    torch.manual_seed(0)
    logits = torch.randn(4, 128, 1000, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 1000, (4, 128))
    plain = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    (want,) = torch.autograd.grad(plain, logits)
    with LargestFloat32() as mode:
        loss = lm_loss(logits, targets)
        (got,) = torch.autograd.grad(loss, logits)
    assert mode.largest <= 64 * 1000 < logits.numel()
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=0)
    torch.testing.assert_close(got, want)
    per_token = lm_loss(logits.detach(), targets, reduction="none")
    torch.testing.assert_close(per_token.mean(), plain.detach(), rtol=1e-6, atol=0)
