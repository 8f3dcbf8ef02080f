"""Tools that build, validate and inspect webdataset shards (the ``moe-dist-data`` command)."""

# The shard writer's caption cap, here (not in shard.py) so that ``moe-dist-data --help`` imports no torch.
DEFAULT_MAX_CAPTION_CHARS = 1000
