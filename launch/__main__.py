"""`python -m launch` → launch.cli.main."""

import sys

from launch.cli import main

sys.exit(main())
