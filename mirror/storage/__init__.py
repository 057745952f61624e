"""On-disk storage: content-addressed blobs, repository links and upload sessions."""
