"""Build and verify WebDataset tar shards: ``python -m shards build|verify`` (see README.md)."""
