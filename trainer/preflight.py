"""Every check a training run needs before any process group, model or index exists, so a bad config, missing
data or a --save that holds another run costs nothing: the shards against the vocabulary, the layout and batch,
--save and --load."""

import warnings
from pathlib import Path

from pile_tools.checksums import read_checksums
from pile_tools.encoding import TokenizerError, eod_id, file_sha256, load_reference, resolve_tokenizer
from pile_tools.shards_dir import manifest_tokenizer
from trainer.checkpoint import has_run, step_of
from trainer.config import ConfigError, DataConfig, NeoXConfig, load_config
from trainer.reshard import holds_weights
from trainer.samples import Packing, check_shards, data_directory, resolve_sources, shards_manifest


def check_save(save: str | None, load: str | None) -> None:
    """Refuse a --save that holds a run unless this run continues it (--load of the same directory)."""
    latest = has_run(Path(save)) if save is not None else None
    if latest is not None and (load is None or Path(load).resolve() != Path(save).resolve()):
        raise ConfigError(
            f"--save {save} holds a run at step {step_of(latest)}: add --load {save} to continue it, "
            "or choose another directory"
        )


# What decides the shapes of the weights: a checkpoint loads only into a model that agrees on all of them.
SHAPES = ("num_layers", "hidden_size", "num_attention_heads", "intermediate_size", "padded_vocab_size")
# What else decides the function the weights compute (the vocabulary: what each id means). A resume continues one
# model, so it must agree on all of them; a run that starts from the weights (finetune) may change them on purpose
# (rotary_emb_base, to extend the context), with a warning.
FUNCTION = ("vocab_size", "rotary_pct", "rotary_emb_base", "gpt_j_residual", "layernorm_epsilon", "gelu_approximate")


def shown(value) -> str:
    """A config value in a message: counts with thousands separators."""
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def differences(saved, model, keys: tuple[str, ...]) -> list[str]:
    """The keys of `keys` on which two ModelConfigs differ, in words."""
    return [
        f"{k} {shown(getattr(saved, k))} (this run: {shown(getattr(model, k))})"
        for k in keys
        if getattr(saved, k) != getattr(model, k)
    ]


def load_advice(saved, model, shapes: list[str]) -> str:
    """What to do about a checkpoint whose model differs from the run's."""
    if saved.vocab_size != model.vocab_size:
        return f"set vocab_size {saved.vocab_size} (the checkpoint's tokenizer) or load it with its own config"
    if len(shapes) == 1 and shapes[0].startswith("padded_vocab_size"):  # the padding: divisible_by x TP
        return (
            f"choose make_vocab_size_divisible_by so that it x model_parallel_size divides {saved.padded_vocab_size:,}"
        )
    return "load it with the model it was trained with"


def check_load(where: Path, config: NeoXConfig, resume: bool) -> None:
    """Refuse a checkpoint whose weights have other shapes than this run's model, or, for a resume, any other
    architecture, naming each key that differs (before DeepSpeed reads it and fails on the first tensor, or the
    run silently goes on with another model); a run that starts from the weights is warned of the rest."""
    if not (where / "config.yml").is_file():
        return  # a checkpoint from before config.yml: DeepSpeed's own check
    saved, model = load_config(where / "config.yml").model, config.model
    shapes, others = differences(saved, model, SHAPES), differences(saved, model, FUNCTION)
    if shapes or (resume and others):
        differ = ", ".join(shapes + (others if resume else []))
        raise ConfigError(f"--load {where}: the checkpoint's model has {differ}; {load_advice(saved, model, shapes)}")
    if others:
        warnings.warn(
            f"--load {where}: the checkpoint's model has {', '.join(others)}; its weights start a model that computes "
            "another function",
            stacklevel=3,
        )


def check_started_from(save: Path, tag: str, load: Path) -> None:
    """A run that starts from --load's weights finds a run in --save: resume it when it started from those weights
    (the same command, requeued) or from any weights when --save is --load (a fine-tune resumed as any run);
    refuse any other run there, whose checkpoints this one would mix with its own."""
    started = (read_checksums(save / tag) or {}).get("started_from")
    same = save.resolve() == load.resolve()
    if started is not None and (same or started == str(load.resolve())):
        warnings.warn(
            f"--save {save} holds this run at step {step_of(tag)} (started from {started}): resuming it", stacklevel=3
        )
        return
    if same:
        raise ConfigError(
            f"finetune: true starts a new run at step 0 from the weights of --load {load}: give it another --save, "
            "whose checkpoints it would mix with its own"
        )
    raise ConfigError(
        f"--save {save} holds a run at step {step_of(tag)} that did not start from the weights of --load {load}: "
        "choose another --save, or resume that run with --load and --save both it (and finetune: false)"
    )


def shipped_tokenizer(data: DataConfig, manifest: dict) -> str | None:
    """The tokenizer.json that checkpoints ship: the config's (`tokenizer`, a file or a bundled name, or
    HFTokenizer's `vocab_file`), which must be a tokenizers file, else the one the shards were built with (while
    it is still the file their manifest records)."""
    shards = manifest.get("tokenizer", {})
    if data.tokenizer_file is None:
        path = manifest_tokenizer(manifest)
        return str(path) if path is not None else None
    key = "tokenizer" if data.tokenizer else "vocab_file"
    try:
        path = resolve_tokenizer(data.tokenizer_file)
        load_reference(path)
    except TokenizerError as e:
        raise ConfigError(f"{key}: {e}") from None
    if shards.get("sha256") and file_sha256(path) != shards["sha256"]:
        warnings.warn(
            f"{key}: {data.tokenizer_file} is not the tokenizer the shards were built with ({shards.get('path')}, "
            "manifest.json): checkpoints ship it, and decode the model's ids with it",
            stacklevel=3,
        )
    return str(path)


def check_run(config: NeoXConfig) -> tuple[dict, str | None, str | None, Path | None, Packing]:
    """Every check that needs no process group: sources, shards, vocabulary, layout, batch, --save, --load.

    Returns (sources, tokenizer to ship, the run directory to resume or None, the checkpoint or run directory
    whose weights start the run at step 0 or None, how a sample's documents are shown to the model). --load of a
    run resumes it (finetune: true takes its weights only); --load of a checkpoint that is not a run (import-hf's
    output, a global_stepN directory) starts from its weights."""
    if config.training.seq_length > config.model.max_position_embeddings:  # rotary would run past its table
        raise ConfigError(
            f"seq_length {config.training.seq_length} exceeds max_position_embeddings "
            f"{config.model.max_position_embeddings}"
        )
    config.global_batch(config.world_size())  # DP, and train_batch_size against micro x accumulation x DP
    save, load, weights = config.paths.save, config.paths.load, None
    tag = has_run(Path(load)) if load is not None else None
    from_weights = load is not None and (config.training.finetune or tag is None and holds_weights(Path(load)))
    if config.training.finetune and load is None:
        raise ConfigError("finetune: true needs --load (or load:), the checkpoint whose weights the run starts from")
    ours = has_run(Path(save)) if from_weights and save is not None else None
    if ours is not None:  # a run started from weights, requeued: resume it, as any run (or refuse another)
        check_started_from(Path(save), ours, Path(load))
        from_weights, load, tag = False, save, ours
    if from_weights:
        if tag is None and not holds_weights(Path(load)):
            raise ConfigError(
                f"finetune: --load {load} holds no checkpoint (a run's directory, or config.yml with weights)"
            )
        check_load(Path(load) / tag if tag else Path(load), config, resume=False)
        weights, load = Path(load), None
    else:
        check_save(save, load)
    if load is not None and tag is None:  # as Megatron and gpt-neox: start afresh
        warnings.warn(f"--load: no checkpoint in {load} yet ('latest' missing): starting from step 0", stacklevel=2)
        load = None
    if load is not None:
        check_load(Path(load) / tag, config, resume=True)
    sources, tokenizer, packing = check_data(config)
    if save is None:
        warnings.warn("no --save directory: no checkpoint of this run is kept", stacklevel=2)
    return sources, tokenizer, load, weights, packing


def check_data(config: NeoXConfig) -> tuple[dict, str | None, Packing]:
    """(sources, the tokenizer checkpoints ship, how a sample's documents are shown to the model): the shards are
    there, agree with their .idx and fit the vocabulary; packing knows its EOD id."""
    sources = resolve_sources(config.data)
    manifest = shards_manifest(data_directory(config.data))
    shards = manifest.get("tokenizer", {})
    if shards.get("vocab_size", 0) > config.model.vocab_size:
        raise ConfigError(
            f"vocab_size: the shards' tokenizer has {shards['vocab_size']:,} ids, the model {config.model.vocab_size:,}"
        )
    check_shards(sources, config.model.vocab_size)
    tokenizer = shipped_tokenizer(config.data, manifest)
    return sources, tokenizer, Packing.of(config, packing_eod(config, shards, tokenizer))


def packing_eod(config: NeoXConfig, shards: dict, tokenizer: str | None) -> int | None:
    """The EOD id that closes each document, for eod_mask_loss and the resets: the shards' manifest records it,
    else the tokenizer's <|endoftext|>; None when the run packs nothing apart."""
    if not config.training.packing:
        return None
    if shards.get("eod") is not None:
        return shards["eod"]
    if tokenizer is None:
        raise ConfigError(
            "eod_mask_loss, reset_attention_mask and reset_position_ids need the EOD id: use shards from build-shards "
            "(their manifest.json records it), or name the tokenizer (tokenizer: or vocab_file:)"
        )
    return eod_id(load_reference(Path(tokenizer)), Path(tokenizer))
