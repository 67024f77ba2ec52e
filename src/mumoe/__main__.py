"""python -m mumoe: the mumoe command line."""

import sys

from .cli import main

sys.exit(main())
