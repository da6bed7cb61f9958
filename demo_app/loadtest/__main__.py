"""``python -m demo_app.loadtest``: see ``demo_app.loadtest.cli``."""

from demo_app.loadtest.cli import main

raise SystemExit(main())
