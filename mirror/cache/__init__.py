"""The access index of stored blobs and the LRU evictor that keeps cached content within its bound."""
