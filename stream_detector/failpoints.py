"""Fault injection for the reliability suite and the soak benchmark: ``FailPoints``, named
places in the worker's loop where the process kills itself (SIGKILL, no clean-up) on a
chosen hit, configured by ``Settings.failpoints``. Empty in production, where ``hit``
costs one dictionary lookup. (The cuttable TCP proxy is in ``devtools.proxy``.)
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping

logger = logging.getLogger(__name__)


class FailPoints:
    """Counts hits per failpoint; on the configured hit the process dies with SIGKILL."""

    def __init__(self, kill_at: Mapping[str, int]) -> None:
        self._kill_at = dict(kill_at)
        self._hits: dict[str, int] = {}

    def hit(self, name: str) -> None:
        """Record that the worker reached ``name``; die here if this is the configured hit."""
        if name not in self._kill_at:
            return
        self._hits[name] = self._hits.get(name, 0) + 1
        if self._hits[name] == self._kill_at[name]:
            logger.warning("failpoint %s: hit %d, killing the process", name, self._hits[name])
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)
