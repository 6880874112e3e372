"""`python -m agents.token_refresher` runs the refresher like its console script."""

import sys

from agents.token_refresher.cli import main

sys.exit(main())
