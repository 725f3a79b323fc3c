"""The speed-ups for pynetdicom 3.0.x in the daemons, each switchable for an A/B
(issue 7; README, Performance, where each one's figure is kept).

Each one lives in its own module; this one only decides which are on. Two earlier ones
were dropped after an interleaved A/B showed they saved nothing: whole-PDU socket reads
(they cost ~9 % CPU instead) and pydicom's value validation off (±2 %).

========== ================================================================================
switch     what it does
========== ================================================================================
reactors   DUL and association reactors wait for work instead of 1 ms polling, and the
           outgoing P-DATA queue is bounded (:mod:`pipeline.dicom.reactors`)
commands   DIMSE command sets, and C-STORE ones straight from the primitive, encoded
           without pydicom's general writer (:mod:`pipeline.dicom.commands`)
handlers   pynetdicom's "standard" logging handlers — which format every PDU and DIMSE
           message into INFO/DEBUG lines before the logger drops them — are not bound
           unless the ``pynetdicom`` logger shows INFO (``pynetdicom_log_level``): its
           own ``_config.LOG_HANDLER_LEVEL``, read by ``_bind_defaults``
datapath   the sender writes each C-STORE-RQ itself on the negotiated association: the
           command set, then the data set from the file with ``os.sendfile`` in PDVs
           of at most the peer's maximum PDU (issue 13;
           :mod:`pipeline.dicom.store_send`); with ``reactors`` the DUL thread hands
           the socket over once negotiated and the sender reads its own responses,
           TLS and transcoded data sets included (:mod:`pipeline.dicom.send_session`);
           without it transcoded data sets, TLS and anything unusual take
           ``send_c_store``
recvpath   the receiver reads each association itself once pynetdicom has negotiated
           it: PDUs into one buffer, the C-STORE-RQ command set, the data set straight
           into the temp file, the C-STORE-RSP written after the file is durable
           (issue 13; :mod:`pipeline.dicom.store_receive`; needs ``reactors``, whose
           DUL thread hands the socket over)
========== ================================================================================

``DICOMFLOW_FASTPATH=0`` in the environment turns them all off (troubleshooting, and
the benchmark's ``dicomflow-stock``): pynetdicom's own reactors and encoders; what is
correctness stays on (:mod:`pdu_guard`, :mod:`peer_reset`,
the bounded association of :mod:`transfer`, the file-meta writer of :mod:`filemeta`);
``DICOMFLOW_PATCHES_OFF=reactors,commands,datapath,recvpath`` turns off the ones named. Only the daemons
call :func:`install` (through :func:`pipeline.dicom.patches.install`), after logging is
set up; it is idempotent. pynetdicom is pinned to 3.0.4 because this relies on its
private structure (hashed by ``tests/test_packaging.py``).
"""

from __future__ import annotations

import logging
import os
import threading

from pynetdicom import _config

from pipeline import switches
from pipeline.dicom import commands, reactors, store_receive, store_send
from pipeline.dicom.commands import _encode_element, encode_c_store_command, encode_command_set
from pipeline.dicom.reactors import wake_dul

SWITCHES = ("reactors", "commands", "handlers", "datapath", "recvpath")

# re-exported: the encoders are tested against pynetdicom's through this module
__all__ = ["SWITCHES", "_encode_element", "encode_c_store_command", "encode_command_set",
           "enabled", "install", "wake_dul"]

_installed = False
_lock = threading.Lock()


def enabled(environ: os._Environ[str] | dict[str, str] | None = None) -> frozenset[str]:
    """The switches that are on, from ``DICOMFLOW_FASTPATH`` and ``DICOMFLOW_PATCHES_OFF``
    (an unknown name in the latter is ignored: it only ever turns things off)."""
    return frozenset(name for name in SWITCHES if switches.is_on(name, environ))


def _quiet_handlers(requestor: bool) -> None:
    """pynetdicom binds its four logging handlers to every association (and server) only
    when ``LOG_HANDLER_LEVEL`` is "standard": leave them out when the ``pynetdicom``
    logger would drop their INFO/DEBUG lines anyway (~10 % of the sender's Python time).
    A requesting process (send, echo) never binds them: it asks for every association
    with pynetdicom's logger silenced (``scu.quiet``), so they were never bound there.
    Decided once, so logging must be set up first."""
    if requestor or not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        _config.LOG_HANDLER_LEVEL = "none"


def install(requestor: bool = False) -> None:
    """Install every speed-up that is switched on (process-wide, idempotent);
    ``requestor``: the process only asks for associations (send, echo)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
        on = enabled()
        if "handlers" in on:
            _quiet_handlers(requestor)
        if "reactors" in on:
            reactors.install()
        if "reactors" in on or "commands" in on:
            commands.install(direct="commands" in on)
        if "datapath" in on:
            store_send.install()
        if "recvpath" in on and "reactors" in on and not requestor:
            store_receive.install()
