"""``python -m ichiban_comm.report RUN_DIR``."""

import sys

from .cli import main

sys.exit(main())
