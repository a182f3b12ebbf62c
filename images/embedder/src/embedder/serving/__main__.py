"""``python -m embedder.serving``: see :mod:`embedder.serving.cli`."""

import sys

from embedder.serving.cli import main

sys.exit(main())
