"""The runtime ("the engine"): runner, store, keys, executors, stats."""
