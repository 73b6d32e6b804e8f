"""Patches every Python process started with tests/slowed on PYTHONPATH, worker processes included.

Python imports ``sitecustomize`` at start-up, so the forkserver of the features stage and the workers it
forks apply the patches too:

* CLIP_DELAY / CLIPS_LOG: tests/slow_features.py (seconds before each clip; a log of the clips computed).
  The kill -9 test uses it so that a run with worker processes is still computing when it is killed,
  however fast the machine;
* DISK_HOLDS_BATCHES: tests/enospc_batches.py (a batch file written beyond the first N meets a full disk).
"""

import os
import sys
from pathlib import Path

if os.environ.get("CLIP_DELAY") or os.environ.get("CLIPS_LOG") or os.environ.get("DISK_HOLDS_BATCHES"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if os.environ.get("CLIP_DELAY") or os.environ.get("CLIPS_LOG"):
        import slow_features  # noqa: F401  (the patch is applied on import)
    if os.environ.get("DISK_HOLDS_BATCHES"):
        import enospc_batches  # noqa: F401
