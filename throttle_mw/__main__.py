"""``python -m throttle_mw``: the live-limits tool (see `throttle_mw.cli`)."""

import sys

from .cli import main

sys.exit(main())
