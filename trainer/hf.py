"""Conversion to and from Hugging Face's GPTNeoXForCausalLM: export-hf and import-hf.

The state dict keys are HF's, so converting is a rename of the output layer at most (`embed_out` here, in
transformers 4 and in the released checkpoints; `lm_head` inside transformers 5, which reads `embed_out` files too).
The config is built through transformers' own class, so transformers 4 and 5 each store it their way.
"""

import json
import pickle
import warnings
from pathlib import Path

import torch

from pile_tools.ground import check_writable, writing
from trainer.checkpoint import checkpoint_dir, copy_tokenizer, load_checkpoint, save_checkpoint, save_weights
from trainer.config import ConfigError, NeoXConfig, TrainingConfig
from trainer.data_only import WHY, Refused, unsafe_globals
from trainer.model import GPTNeoX, ModelConfig

HF_ACT = {"tanh": "gelu_pytorch_tanh", "none": "gelu"}
FROM_HF_ACT = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu": "none"}


def hf_config(m: ModelConfig, eod: int = 0):
    """The GPTNeoXConfig of a model: built through the class, so transformers 4 and 5 each store it their way."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=m.padded_vocab_size,
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        intermediate_size=m.intermediate_size,
        hidden_act=HF_ACT[m.gelu_approximate],
        rotary_pct=m.rotary_pct,
        rotary_emb_base=m.rotary_emb_base,
        max_position_embeddings=m.max_position_embeddings,
        layer_norm_eps=m.layernorm_epsilon,
        use_parallel_residual=m.gpt_j_residual,
        tie_word_embeddings=False,
        bos_token_id=eod,
        eos_token_id=eod,
        architectures=["GPTNeoXForCausalLM"],
    )


def model_config_from_hf(c) -> ModelConfig:
    """Our ModelConfig from a GPTNeoXConfig of transformers 4 (rotary_pct) or 5 (rope_parameters)."""
    rope = getattr(c, "rope_parameters", None) or {}
    rotary_pct = rope.get("partial_rotary_factor", getattr(c, "rotary_pct", 1.0))
    base = rope.get("rope_theta", getattr(c, "rotary_emb_base", 10000))
    if c.hidden_act not in FROM_HF_ACT:
        raise ConfigError(f"hidden_act {c.hidden_act!r} is not a GELU this model implements")
    if getattr(c, "tie_word_embeddings", False):
        raise ConfigError("tie_word_embeddings: GPT-NeoX's input and output embeddings are untied")
    return ModelConfig(
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        num_attention_heads=c.num_attention_heads,
        vocab_size=c.vocab_size,
        max_position_embeddings=c.max_position_embeddings,
        rotary_pct=rotary_pct,
        rotary_emb_base=int(base),
        gpt_j_residual=c.use_parallel_residual,
        intermediate_size=c.intermediate_size,
        layernorm_epsilon=c.layer_norm_eps,
        gelu_approximate=FROM_HF_ACT[c.hidden_act],
        make_vocab_size_divisible_by=128 if c.vocab_size % 128 == 0 else 1,
    )


def export_hf(checkpoint: str | Path, output: str | Path, tokenizer: str | None = None) -> Path:
    """Write config.json, model.safetensors and the tokenizer files that GPTNeoXForCausalLM/AutoTokenizer load."""
    from pile_tools.encoding import resolve_tokenizer

    out = check_writable(Path(output))
    model, config = load_checkpoint(checkpoint)
    source = resolve_tokenizer(tokenizer) if tokenizer else checkpoint_dir(checkpoint) / "tokenizer"
    if not (source.is_file() or (source / "tokenizer.json").is_file()):
        warnings.warn(f"{checkpoint} holds no tokenizer; shipping the released GPT-NeoX-20B one", stacklevel=2)
        source = resolve_tokenizer("gpt-neox-20b")
    with writing(out):
        copy_tokenizer(source, out)
        hf_config(config.model).save_pretrained(out)
        save_weights(model, out / "model.safetensors")
    return out


def check_model_type(hf_dir: Path) -> None:
    """Refuse, before anything is built, a directory that does not hold a GPT-NeoX model."""
    path = hf_dir / "config.json"
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing; not a Hugging Face model directory") from None
    except (ValueError, AttributeError):
        raise ConfigError(f"{path}: not a JSON object") from None
    if model_type != "gpt_neox":
        raise ConfigError(f"{path}: model_type {model_type!r}, not a GPT-NeoX model (gpt_neox)")


def refuse_pickles(hf_dir: Path) -> None:
    """Refuse, naming the file, PyTorch weights (`pytorch_model*.bin`, read where there is no safetensors file)
    that would run code when loaded; transformers loads them weights-only too, but its refusal is a traceback."""
    if any(hf_dir.glob("*.safetensors")):
        return
    for path in sorted(hf_dir.glob("pytorch_model*.bin")):
        if wanted := unsafe_globals(path, with_deepspeed=False):
            raise Refused(f"{path}: refused to load: it needs {', '.join(wanted[:3])}, {WHY}")


def import_hf(hf_dir: str | Path, output: str | Path) -> Path:
    """A checkpoint from a Hugging Face GPT-NeoX directory (Pythia, GPT-NeoX-20B, or our own export)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hf_dir = Path(hf_dir)
    check_model_type(hf_dir)
    check_writable(Path(output).absolute().parent)
    model_config = model_config_from_hf(GPTNeoXConfig.from_pretrained(hf_dir))
    refuse_pickles(hf_dir)
    try:
        hf_model = GPTNeoXForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
        raise ConfigError(
            f"{hf_dir}: transformers cannot load its weights ({' '.join(str(e).split())[:300]})"
        ) from None
    state = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in hf_model.state_dict().items()}
    model = GPTNeoX(model_config)
    expected = set(model.state_dict())
    model.load_state_dict({k: v for k, v in state.items() if k in expected})
    config = NeoXConfig(model=model_config, training=TrainingConfig(seq_length=model_config.max_position_embeddings))
    tokenizer = hf_dir if (hf_dir / "tokenizer.json").is_file() else None
    return save_checkpoint(model, config, output, tokenizer)
