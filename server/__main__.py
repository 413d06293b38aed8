"""Entry point: ``python -m server --artifacts DIR``."""
import sys

from server.app import main

sys.exit(main())
