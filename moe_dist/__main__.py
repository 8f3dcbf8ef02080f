"""``python -m moe_dist`` = ``moe-dist`` (what the deepspeed launcher runs with --module moe_dist)."""

import sys

from .cli import main

sys.exit(main())
