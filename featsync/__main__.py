"""``python -m featsync`` is ``featsync``."""

from __future__ import annotations

import sys

from featsync.cli import main

sys.exit(main())
