"""Federated LoRA: the protocol both runners share, Flower's simulation engine, and a deployment app."""
