"""The speed-up switches' environment, read in one place: ``DICOMFLOW_FASTPATH=0``
turns every one off, ``DICOMFLOW_PATCHES_OFF=a,b`` the ones named (troubleshooting and
A/B runs; README, Performance). Free of pynetdicom, so that the filter — which installs
no pynetdicom patch — reads its own switch (``scan``) the same way the daemons'
:mod:`pipeline.dicom.fastpath` reads theirs."""

from __future__ import annotations

import os
from collections.abc import Mapping


def is_on(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether switch ``name`` is on (an unknown name in ``DICOMFLOW_PATCHES_OFF`` is
    ignored: it only ever turns things off)."""
    env = os.environ if environ is None else environ
    if env.get("DICOMFLOW_FASTPATH", "1") == "0":
        return False
    return name not in {part.strip() for part in env.get("DICOMFLOW_PATCHES_OFF", "").split(",")}
