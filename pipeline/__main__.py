"""``python -m pipeline`` is the ``pipeline`` command."""

import sys

from .cli import main

sys.exit(main())
