"""`python -m reformer ...` is the `reformer` command."""

import sys

from .cli import main

sys.exit(main())
