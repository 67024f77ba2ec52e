"""python -m mumoe.cli"""

import sys

from . import main

sys.exit(main())
