"""Tools that build, validate and inspect webdataset shards (the ``moe-dist-data`` command)."""
