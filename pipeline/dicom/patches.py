"""The one place the daemons install their changes to pynetdicom and pydicom.

Nothing in this package patches anything at import time: a daemon's ``main`` calls
:func:`install` once, after logging is set up, so a test or a tool that imports our
modules gets pynetdicom as released. pynetdicom is pinned to 3.0.4 and the source of
every callable replaced or relied on is hashed by ``tests/test_packaging.py``.
"""

from __future__ import annotations

from pipeline.dicom import dimse_cap, fastpath, filemeta, pdu_guard, peer_reset, scu


def install(daemon: str) -> None:
    """Install what ``daemon`` (``receive``, ``send`` or ``echo``) needs (the filter never
    touches the network and installs nothing).

    The limits on what a peer can make us read (:mod:`pdu_guard`) and hold
    (:mod:`dimse_cap`: a DIMSE message assembled by pynetdicom), and the quiet
    connection-loss lines (:mod:`peer_reset`) are correctness, always on; the speed-ups
    (:mod:`fastpath`) are off with ``DICOMFLOW_FASTPATH=0``, one by one with
    ``DICOMFLOW_PATCHES_OFF`` (README, Performance).
    """
    peer_reset.install()
    pdu_guard.install()
    dimse_cap.install()
    if daemon == "receive":
        filemeta.install_ae_slots()
    else:
        scu.configure()
    fastpath.install(requestor=daemon != "receive")
