"""LoRA adapters as PEFT folders and state dicts: reading and writing, merging, aligning, pruning."""
