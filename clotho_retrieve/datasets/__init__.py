"""Where clips come from: each module turns one kind of source into feature jobs (features.Job).

* ``clotho``: Clotho v2.1, the one place that knows its splits, its Zenodo files, its caption CSVs and
  its folder layout.
* ``folder``: any folder of audio files (recursively), without captions.
"""
