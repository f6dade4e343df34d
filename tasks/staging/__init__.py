"""The steps of a stage, in order: request (checked input), resolve (the revision), survey (what the
source and the bucket hold), plan, pipeline (download, verify, upload per file), shards (Dask),
publish; hash_cache keeps hashes of verified bytes between runs."""
