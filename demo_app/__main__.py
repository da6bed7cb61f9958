"""``python -m demo_app``: run SurveyTool locally and play its story with the throttle
off and then on (see `demo_app.newcomer`)."""

import sys

from demo_app.newcomer import main

if __name__ == "__main__":
    sys.exit(main())
