"""Limits on the DIMSE messages pynetdicom assembles (pynetdicom 3.0.4).

On pynetdicom's own DIMSE path (``DICOMFLOW_FASTPATH=0``, or any association proposing
MPPS: ``store_receive.decline``) every P-DATA fragment of a message is appended to a
``BytesIO`` until the last one arrives: the command set always, the data set unless it
is a chunked C-STORE (that one goes to a temp file on the spool). Nothing bounds either,
so a peer that sends an N-CREATE with an endless data set makes the receiver allocate
as much as it sends. And a command pynetdicom cannot turn into a primitive (a UID of
more than 64 characters: its UID setter refuses it) is logged as an ERROR with a
traceback, after pynetdicom's own ERROR line for the value.

This module replaces ``DIMSEServiceProvider.receive_primitive`` with a copy that:

* refuses a message whose command set would pass ``COMMAND_CAP`` or whose in-memory data
  set would pass ``DATASET_CAP``, *before* appending the fragment that crosses it;
* checks the command's UIDs with pynetdicom's own validator before converting it, and
  refuses a message whose decoding or conversion fails for any other reason (an
  unknown command field raised out of ``decode_msg`` and ended the DUL thread with a
  traceback).

A refused message is dropped at once (its buffers are freed) and the association is
aborted the way pynetdicom aborts on an invalid PDU (Evt19: A-ABORT to the peer, the
fragments still in flight read and ignored until the peer leaves or the ARTIM timer
expires); one WARNING line says why. Everything else is upstream's code unchanged.
Installed by every daemon whatever ``DICOMFLOW_FASTPATH`` says: a limit, not an
optimisation. :func:`install` is idempotent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pynetdicom import _config, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_CANCEL, N_EVENT_REPORT
from pynetdicom.dsutils import decode
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.utils import make_target

from pipeline.dicom.peer_reset import describe_peer
from pipeline.log import escape, logger

MiB = 1024 * 1024
#: Most bytes of one message's data set held in memory. MPPS N-CREATE/N-SET data sets
#: are a few KiB (about 120 bytes more per referenced instance: ~12 MiB at the record's
#: ``mpps.MAX_INSTANCES`` with 64-character UIDs, which a test checks fits); 16 MiB is
#: generous for any non-C-STORE message and bounds what a peer can make us hold per
#: association. A data set received into a temp file (a C-STORE with chunked receive,
#: which the receiver always uses) is not held in memory and not counted.
DATASET_CAP = 16 * MiB
#: Most bytes of one command set (real ones are well under 1 KiB).
COMMAND_CAP = 64 * 1024
UID_MAX = 64  # PS3.5 §9.1

_lock = threading.Lock()
_installed = False
#: The pynetdicom 3.0.4 functions this module replaces or relies on (a test pins their source).
UPSTREAM: dict[str, Callable[..., Any]] = {
    "DIMSEServiceProvider.receive_primitive": DIMSEServiceProvider.receive_primitive,
    "DIMSEMessage.decode_msg": DIMSEMessage.decode_msg,
    "DIMSEMessage.message_to_primitive": DIMSEMessage.message_to_primitive,
}


def _incoming(primitive: P_DATA) -> tuple[int, int]:
    """Bytes of command and of data-set fragments this P-DATA adds (control bytes excluded)."""
    command = data = 0
    for _context_id, value in primitive.presentation_data_value_list:
        if not value:
            continue
        if value[0] & 1:
            command += len(value) - 1
        else:
            data += len(value) - 1
    return command, data


def oversize(message: DIMSEMessage, primitive: P_DATA) -> str | None:
    """Why appending ``primitive`` to ``message`` would pass a cap, or None."""
    command, data = _incoming(primitive)
    held = message.encoded_command_set.tell()
    if held + command > COMMAND_CAP:
        return f"command set longer than {COMMAND_CAP} bytes"
    if message._data_set_file is None and isinstance(message.data_set, BytesIO):
        held = message.data_set.tell()
        if held + data > DATASET_CAP:
            return f"data set longer than {DATASET_CAP} bytes (the limit for one held in memory)"
    return None


def _uid_values(raw: object) -> list[str]:
    """The values of a UI element, raw (bytes as received) or already converted."""
    if isinstance(raw, bytes | bytearray):
        return bytes(raw).decode("latin-1").rstrip("\0 ").split("\\")
    if isinstance(raw, str):
        return [raw]
    if hasattr(raw, "__iter__"):  # a MultiValue
        return [str(value) for value in cast(Any, raw)]
    return []


def completed_command(message: DIMSEMessage, primitive: P_DATA) -> Dataset | None:
    """The command set ``primitive`` completes (its last fragment is in it), read
    lazily (raw elements), or None: not complete yet, or not readable (then
    ``decode_msg`` fails on it and says so)."""
    encoded = bytearray()
    for _context_id, value in primitive.presentation_data_value_list:
        if value and value[0] & 1:
            encoded += value[1:]
            if value[0] & 2:
                try:
                    return decode(BytesIO(message.encoded_command_set.getvalue() + encoded),
                                  True, True)
                except Exception:
                    return None
    return None


def invalid_uid(command_set: Dataset) -> str | None:
    """Why a UID of a command set would be refused by pynetdicom, or None.

    Checked before ``decode_msg`` and ``message_to_primitive`` see the command, so that
    the refusal is our one line, not pynetdicom's ERROR line and traceback; the raw
    bytes are read, so pydicom's own value check (a WARNING line) does not run either."""
    validate = _config.VALIDATORS["UI"]
    for tag in command_set.keys():
        try:
            if dictionary_VR(tag) != "UI":
                continue
        except KeyError:  # not a command element pydicom knows: pynetdicom ignores it too
            continue
        for value in _uid_values(command_set.get_item(tag).value):
            if len(value) > UID_MAX:  # before pydicom's UID(), which warns about it
                ok, reason = False, f"longer than {UID_MAX} characters ({len(value)})"
            else:
                ok, reason = validate(value)
            if value and not ok:
                return f"{keyword_for_tag(tag) or tag} {reason}"
    return None


def _discard_file(message: DIMSEMessage) -> None:
    """Close and remove the temp file a chunked C-STORE was being received into."""
    file, path = message._data_set_file, message._data_set_path
    message._data_set_file = message._data_set_path = None
    try:
        if file is not None:
            file.close()
        if isinstance(path, Path):
            path.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("could not remove {}: {}", escape(str(path)), escape(str(exc)))


def _refuse(dimse: DIMSEServiceProvider, reason: str) -> None:
    """Drop the message being assembled and abort the association (Evt19, as upstream)."""
    message = dimse.message
    if message is not None:
        message.encoded_command_set = BytesIO()
        message.data_set = BytesIO()
        _discard_file(message)
    dimse.message = None
    dimse._df_refused = True  # type: ignore[attr-defined]
    logger.warning("aborting association with {}: {}", describe_peer(dimse.assoc), reason)
    dimse.dul.event_queue.put("Evt19")


def receive_primitive(self: DIMSEServiceProvider, primitive: P_DATA) -> None:
    """pynetdicom 3.0.4's ``DIMSEServiceProvider.receive_primitive`` with the caps and
    the UID check of the module docstring; a refused association ignores what follows."""
    if getattr(self, "_df_refused", False):
        return
    if self.message is None:
        self.message = DIMSEMessage()

    reason = oversize(self.message, primitive)
    if reason is not None:
        _refuse(self, reason)
        return
    command_set = completed_command(self.message, primitive)
    reason = invalid_uid(command_set) if command_set is not None else None
    if reason is not None:
        _refuse(self, f"invalid DIMSE message: {escape(reason)}")
        return
    try:
        complete = self.message.decode_msg(primitive, self.assoc)
    except Exception as exc:  # an unknown command field, a command set pydicom cannot read
        _refuse(self, f"undecodable DIMSE message: {type(exc).__name__}: {escape(str(exc))}")
        return
    if complete:
        # Trigger event
        evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": self.message})

        context_id = cast(int, self.message.context_id)
        try:
            d_primitive = self.message.message_to_primitive()
        except Exception as exc:
            _refuse(self, f"invalid DIMSE message: {type(exc).__name__}: {escape(str(exc))}")
            return

        # Keep C-CANCEL requests separate from other messages
        # Only allow up to 10 C-CANCEL requests
        if isinstance(d_primitive, C_CANCEL) and len(self.cancel_req) < 10:
            msg_id = cast(int, d_primitive.MessageIDBeingRespondedTo)
            self.cancel_req[msg_id] = d_primitive
        elif isinstance(d_primitive, N_EVENT_REPORT) and d_primitive.is_valid_request:
            # N-EVENT-REPORT service requests are handled immediately
            t = threading.Thread(
                target=make_target(self.assoc._serve_request),
                args=(d_primitive, context_id),
            )
            t.start()
        else:
            self.msg_queue.put((context_id, cast(Any, d_primitive)))

        # Reset the DIMSE message, ready for the next one (pynetdicom issue #41)
        self.message.encoded_command_set = BytesIO()
        self.message.data_set = BytesIO()
        self.message._data_set_file = None
        self.message._data_set_path = None
        self.message = None


def install() -> None:
    """Install the caps (process-wide, idempotent, independent of the fast path)."""
    global _installed
    with _lock:
        if _installed:
            return
        DIMSEServiceProvider.receive_primitive = receive_primitive  # type: ignore[method-assign]
        _installed = True
