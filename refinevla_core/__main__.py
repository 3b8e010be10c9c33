"""`python -m refinevla_core` is the `refinevla` command."""

import sys

from refinevla_core.cli import main

sys.exit(main())
