"""What the bucket holds and how it is read: layout (keys), catalog (manifests, current pointers,
verification records), lock (one stage per revision), integrity (the hash chain), housekeeping (gc)."""
