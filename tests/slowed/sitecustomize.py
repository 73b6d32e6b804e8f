"""Slows every Python process started with tests/slowed on PYTHONPATH, worker processes included.

Python imports ``sitecustomize`` at start-up, so the forkserver of the features stage and the workers it
forks apply tests/slow_features.py's patch too (CLIP_DELAY: seconds before each clip; CLIPS_LOG). The
kill -9 test uses it so that a run with worker processes is still computing when it is killed, however
fast the machine.
"""

import os
import sys
from pathlib import Path

if os.environ.get("CLIP_DELAY") or os.environ.get("CLIPS_LOG"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import slow_features  # noqa: F401  (the patch is applied on import)
