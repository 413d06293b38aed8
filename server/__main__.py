"""Entry point: ``python -m server --artifacts DIR``; ``python -m server token ...`` adds a caller's token."""

import sys

if sys.argv[1:2] == ["token"]:
    from server.security import token_main

    sys.exit(token_main(sys.argv[2:]))

from server.workers import main

sys.exit(main())
