"""Pure OCI/Docker knowledge: names, references, digests, media types, manifests. No I/O here."""
