"""``python -m moe_dist.cli`` = ``moe-dist``."""

import sys

from . import main

sys.exit(main())
