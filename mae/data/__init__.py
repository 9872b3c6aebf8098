"""Reading images out of WebDataset shards: shard lists and sizes, the epoch plan, the streaming steps and the loader."""
