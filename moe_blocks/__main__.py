"""``python -m moe_blocks``: the moe-blocks command line (moe_blocks.models.cli)."""

import sys

from moe_blocks.models.cli import main

sys.exit(main())
