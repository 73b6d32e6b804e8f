"""The `clotho-retrieve` command line with each computed clip logged and slowed down (a test helper).

Run as a script (``python tests/slow_features.py features ...``, also under torchrun). Environment:
CLIPS_LOG: every process appends the name of each clip it starts computing to CLIPS_LOG.RANK (RANK 0
outside torchrun); CLIP_DELAY: seconds to sleep before each clip. The tests that kill a run mid-way use
the delay so that "mid-way" lasts long enough to hit on any machine, and the log to see what a re-run
computed. Computation must stay in the process (--workers 1): worker processes do not see the patch.
"""

from __future__ import annotations

import os
import sys
import time

from clotho_retrieve import features
from clotho_retrieve.cli import main

_real_compute_clip = features._compute_clip


def _logged_compute_clip(name, path, front_end):
    log = os.environ.get("CLIPS_LOG")
    if log:
        with open(f"{log}.{os.environ.get('RANK', '0')}", "a", encoding="utf-8") as fh:
            fh.write(name + "\n")
    time.sleep(float(os.environ.get("CLIP_DELAY", "0")))
    return _real_compute_clip(name, path, front_end)


features._compute_clip = _logged_compute_clip

if __name__ == "__main__":
    sys.argv[0] = "clotho-retrieve"
    main()
