"""The GPT-NeoX model and its DeepSpeed trainer: configs, the sample order, tensor x pipeline x data parallelism,
checkpoints, planning, generation, evaluation and Hugging Face interop."""
