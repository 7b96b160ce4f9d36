"""``python -m featsync`` is ``featsync``."""

from __future__ import annotations

import signal
import sys

try:
    from featsync.cli import main
except KeyboardInterrupt:  # Ctrl-C while the modules load: nothing begun, no traceback
    sys.exit(128 + signal.SIGINT)

sys.exit(main())
