"""GPT-NeoX model, configs and DeepSpeed trainer (arrives with the model and trainer issues)."""
