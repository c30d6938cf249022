"""``python -m mnm_rl`` runs the ``mnm-rl`` command line."""

import sys

from mnm_rl.cli import main

sys.exit(main())
