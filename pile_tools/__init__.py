"""Reading Pile-format text and writing Megatron token shards."""

__version__ = "0.1.0"
