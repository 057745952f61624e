"""Pull-through logic: single-flight fills streamed while they download, tag TTLs, stale-if-error."""
