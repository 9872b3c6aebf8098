"""Reading images out of WebDataset shards: shard index, decoding, the streaming pipeline."""
