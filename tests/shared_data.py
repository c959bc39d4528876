"""Where tests find the shared corpora (UCR, NAB, MSL): ``DETECTOR_DATA_DIR``, else the
``shared/data`` folder beside the repository. Tests that need them skip when absent."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("DETECTOR_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
