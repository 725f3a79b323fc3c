"""The speed-ups for pynetdicom 3.0.x and pydicom in the daemons, each switchable for
an A/B (issue 7; README, Performance).

Each one lives in its own module; this one only decides which are on:

========== ================================================================================
switch     what it does
========== ================================================================================
reactors   DUL and association reactors wait for work instead of 1 ms polling, and the
           outgoing P-DATA queue is bounded (:mod:`pipeline.dicom.reactors`)
recv       whole-PDU ``recv_into`` instead of 4 KiB reads (:mod:`pipeline.dicom.socket_reads`)
commands   DIMSE command sets, and C-STORE ones straight from the primitive, encoded
           without pydicom's general writer (:mod:`pipeline.dicom.commands`)
validation pydicom's per-value validation off (the daemons validate what reaches a path)
handlers   pynetdicom's "standard" logging handlers — which format every PDU and DIMSE
           message into INFO/DEBUG lines before the logger drops them — are not bound
           unless the ``pynetdicom`` logger shows INFO (``pynetdicom_log_level``): its
           own ``_config.LOG_HANDLER_LEVEL``, read by ``_bind_defaults``
========== ================================================================================

``DICOMFLOW_FASTPATH=0`` in the environment turns them all off (troubleshooting, and
the benchmark's ``dicomflow-stock``) — pynetdicom's own reactors, reads and encoders,
pydicom's validation; what is correctness stays on (:mod:`pdu_guard`, :mod:`peer_reset`,
the bounded association of :mod:`transfer`, the file-meta writer of :mod:`filemeta`);
``DICOMFLOW_PATCHES_OFF=reactors,commands`` turns off the ones named. Only the daemons
call :func:`install` (through :func:`pipeline.dicom.patches.install`), after logging is
set up; it is idempotent. pynetdicom is pinned to 3.0.4 because this relies on its
private structure (hashed by ``tests/test_packaging.py``).
"""

from __future__ import annotations

import logging
import os
import threading

import pydicom.config
from pynetdicom import _config

from pipeline.dicom import commands, reactors, socket_reads
from pipeline.dicom.commands import _encode_element, encode_c_store_command, encode_command_set
from pipeline.dicom.reactors import wake_dul

SWITCHES = ("reactors", "recv", "commands", "validation", "handlers")

# re-exported: the encoders are tested against pynetdicom's through this module
__all__ = ["SWITCHES", "_encode_element", "encode_c_store_command", "encode_command_set",
           "enabled", "install", "tune_pydicom", "wake_dul"]

_installed = False
_lock = threading.Lock()


def enabled(environ: os._Environ[str] | dict[str, str] | None = None) -> frozenset[str]:
    """The switches that are on, from ``DICOMFLOW_FASTPATH`` and ``DICOMFLOW_PATCHES_OFF``
    (an unknown name in the latter is ignored: it only ever turns things off)."""
    env = os.environ if environ is None else environ
    if env.get("DICOMFLOW_FASTPATH", "1") == "0":
        return frozenset()
    off = {name.strip() for name in env.get("DICOMFLOW_PATCHES_OFF", "").split(",")}
    return frozenset(name for name in SWITCHES if name not in off)


def tune_pydicom() -> None:
    """No per-value validation in the daemons (they validate what reaches a path)."""
    if "validation" not in enabled():
        return
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE


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
        if "validation" in on:
            tune_pydicom()
        if "handlers" in on:
            _quiet_handlers(requestor)
        if "reactors" in on:
            reactors.install()
        if "recv" in on:
            socket_reads.install()
        if "reactors" in on or "commands" in on:
            commands.install(direct="commands" in on)
