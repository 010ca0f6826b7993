"""``python -m ocrnet ...``: the same as the ``ocrnet`` command."""

import sys

from .cli import main

sys.exit(main())
