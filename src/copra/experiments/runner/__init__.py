"""How experiments run: shared config fields, the evaluator and its cache, finished-run reuse, worker processes, Ray."""
