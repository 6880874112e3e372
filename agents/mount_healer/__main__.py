"""`python -m agents.mount_healer` runs the healer like its console script."""

import sys

from agents.mount_healer.cli import main

sys.exit(main())
