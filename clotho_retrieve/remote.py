"""``RemoteFile``: one published file (a dataset archive, a checkpoint) and what a download checks."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from clotho_retrieve.utils import ClothoRetrieveError


@dataclass(frozen=True)
class RemoteFile:
    """One file of a Zenodo record: its name on disk, MD5 and size in bytes (None where unknown).

    ``base_url`` is the record's files URL (``https://zenodo.org/record/ID/files/``); a file without one
    is fetched from a mirror only.
    """

    name: str
    md5: str | None
    size: int | None = None
    base_url: str = ""

    def url(self, mirror: str | None = None) -> str:
        """Zenodo's download URL, or ``MIRROR/NAME`` when a mirror base URL is given."""
        if mirror:
            return f"{mirror.rstrip('/')}/{quote(self.name)}"
        if not self.base_url:
            raise ClothoRetrieveError(f"{self.name}: no download URL known; pass --mirror")
        return f"{self.base_url}{quote(self.name)}?download=1"
