"""``python -m gpavatar ...``: the ``gpavatar`` command (:mod:`gpavatar.cli`)."""

import sys

from gpavatar.cli import main

sys.exit(main())
