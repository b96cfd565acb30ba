"""The GPT-NeoX model, its configs, planning, checkpoints and Hugging Face interop (the DeepSpeed trainer next)."""
