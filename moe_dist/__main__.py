"""``python -m moe_dist`` = ``moe-dist`` (what the deepspeed launcher runs with --module moe_dist)."""

from .cli import command

command()
