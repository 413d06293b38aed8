"""Entry point: ``python -m server --artifacts DIR``."""

import sys

from server.workers import main

sys.exit(main())
