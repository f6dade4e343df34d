"""The local stand-ins `make demo`, `make ui` and the tests start: embedded (rclone bucket, olah Hub,
Prefect server) and tiny_llama (the model real vLLM serves here, made deterministically)."""
