"""The training loop and what a run leaves on disk (result, checkpoints, snapshots)."""
