"""``python -m medssl_kit``: the ``medssl`` command line."""

import sys

from medssl_kit.cli import main

sys.exit(main())
