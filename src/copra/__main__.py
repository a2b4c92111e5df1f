"""`python -m copra ...` runs the `copra` command (the same `cli.main`)."""

import sys

from copra.cli import main

sys.exit(main())
