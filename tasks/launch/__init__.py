"""A launch: options (every launch option, checked once), fit (GPUs for the weights and the KV cache),
skytask (the SkyPilot task, pure), targets (sky and local, each making a handle), launcher (one
deployment: prepare, start, readiness, measure), local_target (the local node)."""
