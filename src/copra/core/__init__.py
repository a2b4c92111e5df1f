"""CopRA itself: the keep-probability schedule, the per-layer gates, the run configuration, the Trainer callback."""
