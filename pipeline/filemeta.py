"""Recording who sent a file in its Part-10 file meta, without copying the dataset.

pynetdicom's chunked receive writes the preamble and a file meta at the head of its
temp file, then appends the dataset bytes as they arrive. We make that file meta our
own: three AE-title elements — (0002,0016) Source, (0002,0017) Sending and
(0002,0018) Receiving AE Title — are added with 16 blank characters each, and once
the dataset is complete the real titles are written over the blanks in place (AE is
a fixed 16-byte slot, trailing spaces are insignificant). The dataset itself is
never re-encoded and never copied a second time.
"""

from __future__ import annotations

import os
from pathlib import Path

import pynetdicom.dimse_messages as dimse_messages
from pydicom.dataset import FileMetaDataset
from pynetdicom.dsutils import create_file_meta

AE_SLOT = 16
_BLANK = b" " * AE_SLOT
_TAGS = {
    "source": b"\x02\x00\x16\x00AE\x10\x00",
    "sending": b"\x02\x00\x17\x00AE\x10\x00",
    "receiving": b"\x02\x00\x18\x00AE\x10\x00",
}
_HEAD = 4096  # the file meta we write is ~250 bytes; UIDs are at most 64 characters


def _create_file_meta_with_slots(**kwargs: object) -> FileMetaDataset:
    meta = create_file_meta(**kwargs)  # type: ignore[arg-type]
    meta.SourceApplicationEntityTitle = " " * AE_SLOT
    meta.SendingApplicationEntityTitle = " " * AE_SLOT
    meta.ReceivingApplicationEntityTitle = " " * AE_SLOT
    return meta


def install_ae_slots() -> None:
    """Make pynetdicom's chunked receive write our file meta (with AE-title slots).

    This replaces the ``create_file_meta`` name pynetdicom's DIMSE decoder uses; it is
    process-wide, so only the receive daemon calls it. pynetdicom is pinned to 3.0.x.
    """
    dimse_messages.create_file_meta = _create_file_meta_with_slots  # type: ignore[assignment]


def clean_ae_title(value: object) -> bytes:
    """An AE title from the network as 16 safe bytes (printable ASCII, no backslash)."""
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value or "")
    safe = "".join(ch if 0x20 <= ord(ch) < 0x7F and ch != "\\" else "_" for ch in text.strip())
    return safe[:AE_SLOT].ljust(AE_SLOT).encode("ascii")


def stamp_ae_titles(path: Path, calling: object, called: object) -> None:
    """Write the calling/called AE titles into the blank slots of a received file."""
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        head = os.pread(fd, _HEAD, 0)
        values = {"source": calling, "sending": calling, "receiving": called}
        for slot, tag in _TAGS.items():
            offset = head.find(tag + _BLANK, 132)
            if offset < 0:
                raise ValueError(f"no blank {slot} AE title slot in the file meta of {path.name}")
            os.pwrite(fd, clean_ae_title(values[slot]), offset + len(tag))
    finally:
        os.close(fd)
