"""Credit and comparison: Shapley values of LoRA layers, coalition games on a model, paired statistics."""
