"""``python -m nanoseg``: the ``nanoseg`` command."""

import sys

from nanoseg.cli import main

sys.exit(main())
