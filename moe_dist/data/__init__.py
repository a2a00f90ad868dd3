"""Data: tokenizers, shard preparation, and the streaming resumable loader."""
