"""`python -m rayexec ...` runs the `rayexec` command (see cli.py)."""

import sys

from rayexec.cli import main

sys.exit(main())
