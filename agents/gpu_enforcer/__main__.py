"""`python -m agents.gpu_enforcer` runs the enforcer like its console script."""

import sys

from agents.gpu_enforcer.cli import main

sys.exit(main())
