"""``python -m moe_dist.cli`` = ``moe-dist``."""

from . import command

command()
