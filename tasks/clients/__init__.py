"""The outside systems, one module each: bucket (S3/R2 via boto3), hub (huggingface_hub), transfer
(s5cmd), sky (SkyPilot's SDK: the cloud boundary), orchestration (Prefect), processes (children in
sessions of their own)."""
