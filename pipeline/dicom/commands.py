"""DIMSE command sets encoded without pydicom's general writer (README, Performance:
switch ``commands``).

* Every command set was encoded twice through pydicom's writer (once for the group
  length, once for real). Command sets are tiny and always Implicit VR Little Endian,
  so a small dedicated encoder does it (:func:`encode_command_set`); anything it does
  not know falls back to pydicom's.
* Sending a C-STORE request or response built a pydicom Dataset for its command set (a
  ``setattr`` per keyword, then values, deletions and a group length computed by
  encoding twice). For C-STORE the command set is now encoded straight from the
  primitive (:func:`encode_c_store_command`); pynetdicom's own ``encode_msg`` still
  fragments it and the data set. Anything unusual (move originator, error comment, a
  bound ``EVT_DIMSE_SENT`` handler) takes pynetdicom's path.

``send_msg`` is replaced whenever the ``reactors`` or the ``commands`` switch is on:
it also applies the message's DIMSE timeout to the bounded send queue
(:func:`pipeline.dicom.reactors.deadline`).
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

import pynetdicom.dimse_messages as dimse_messages
from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode as _pydicom_encode

from pipeline.dicom.reactors import deadline

_direct = False  # C-STORE command sets straight from the primitive (switch ``commands``)

_NUMBERS = {"US": "<H", "UL": "<L", "SS": "<h", "SL": "<l", "FL": "<f", "FD": "<d"}
_TEXT = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UT"}


def _values(value: Any) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, str | int | float | bytes):
        return [value]
    return list(value)


def _encode_element(tag: int, vr: str, value: Any) -> bytes | None:
    """One Implicit VR element, or None for anything unusual (then pydicom encodes it).

    Values can come from a peer (a response echoes the request's UIDs): a non-ASCII
    UID, an out-of-range number or an odd type is not an error here, only a reason to
    take the general path."""
    try:
        return _encode_element_strict(tag, vr, value)
    except (UnicodeEncodeError, struct.error, TypeError, ValueError, OverflowError):
        return None


def _encode_element_strict(tag: int, vr: str, value: Any) -> bytes | None:
    values = _values(value)
    if vr in _NUMBERS:
        if not all(isinstance(v, int | float) for v in values):
            return None
        body = struct.pack("<" + _NUMBERS[vr][1] * len(values), *values)
    elif vr == "UI":
        if not all(isinstance(v, str) for v in values):
            return None
        body = "\\".join(values).encode("ascii")
        if len(body) % 2:
            body += b"\0"
    elif vr in _TEXT:
        if not all(isinstance(v, str) for v in values):
            return None
        body = "\\".join(values).encode("ascii")
        if len(body) % 2:
            body += b" "
    elif vr == "AT":
        if not all(isinstance(v, int) for v in values):
            return None
        body = b"".join(struct.pack("<HH", v >> 16, v & 0xFFFF) for v in values)
    else:
        return None
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(body)) + body


def encode_command_set(ds: Any, is_implicit_vr: bool, is_little_endian: bool,
                       deflated: bool = False) -> bytes | None:
    """Encode a DIMSE command set (group 0000, Implicit VR Little Endian) quickly;
    anything else, or any value of an unexpected type, goes to pydicom's encoder."""
    if isinstance(ds, _EncodedCommand):
        return ds.data
    if not (is_implicit_vr and is_little_endian) or deflated:
        return _pydicom_encode(ds, is_implicit_vr, is_little_endian, deflated)
    parts = []
    try:
        for tag in sorted(ds.keys()):
            if tag >> 16 != 0x0000:
                return _pydicom_encode(ds, is_implicit_vr, is_little_endian, deflated)
            elem = ds[tag]
            encoded = _encode_element(int(tag), elem.VR, elem.value)
            if encoded is None:
                return _pydicom_encode(ds, is_implicit_vr, is_little_endian, deflated)
            parts.append(encoded)
    except (UnicodeEncodeError, struct.error, TypeError, ValueError, KeyError):
        return _pydicom_encode(ds, is_implicit_vr, is_little_endian, deflated)
    return b"".join(parts)


class _EncodedCommand:
    """A command set already encoded (what :func:`encode_command_set` returns as is)."""

    def __init__(self, data: bytes) -> None:
        self.data = data


#: C-STORE command elements after the group length, in tag order: (tag, VR, keyword or
#: a fixed value). Optional elements absent from the primitive are left out.
_C_STORE_RQ = ((0x00000002, "UI", "AffectedSOPClassUID"), (0x00000100, "US", 0x0001),
               (0x00000110, "US", "MessageID"), (0x00000700, "US", "Priority"),
               (0x00000800, "US", None), (0x00001000, "UI", "AffectedSOPInstanceUID"))
_C_STORE_RSP = ((0x00000002, "UI", "AffectedSOPClassUID"), (0x00000100, "US", 0x8001),
                (0x00000120, "US", "MessageIDBeingRespondedTo"), (0x00000800, "US", 0x0101),
                (0x00000900, "US", "Status"), (0x00001000, "UI", "AffectedSOPInstanceUID"))
_C_STORE_UNUSUAL = ("MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID",
                    "OffendingElement", "ErrorComment")


def encode_c_store_command(primitive: C_STORE) -> bytes | None:
    """The command set pynetdicom would encode for a C-STORE request or response
    primitive, or None when this encoder does not cover it."""
    try:
        return _encode_c_store_command(primitive)
    except (UnicodeEncodeError, struct.error, TypeError, ValueError, OverflowError, AttributeError):
        return None  # values from a peer this encoder does not cover: pynetdicom's path


def _encode_c_store_command(primitive: C_STORE) -> bytes | None:
    if any(getattr(primitive, name, None) is not None for name in _C_STORE_UNUSUAL):
        return None
    is_request = primitive.MessageIDBeingRespondedTo is None
    if is_request:
        has_data = bool(primitive.DataSet) or bool(getattr(primitive, "_dataset_path", None))
        data_type = 0x0001 if has_data else 0x0101
    parts = []
    for tag, vr, source in _C_STORE_RQ if is_request else _C_STORE_RSP:
        if source is None:
            value: Any = data_type
        elif isinstance(source, int):
            value = source
        else:
            value = getattr(primitive, source)
            if value is None:
                continue
        encoded = _encode_element(tag, vr, value)
        if encoded is None:
            return None
        parts.append(encoded)
    body = b"".join(parts)
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


_orig_send_msg = DIMSEServiceProvider.send_msg


def _dimse_send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    """pynetdicom's ``send_msg`` with C-STORE command sets encoded directly."""
    if _direct and type(primitive) is C_STORE and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
        command = encode_c_store_command(primitive)
        if command is not None:
            msg: dimse_messages.C_STORE_RQ | dimse_messages.C_STORE_RSP
            if primitive.MessageIDBeingRespondedTo is None:
                msg = dimse_messages.C_STORE_RQ.__new__(dimse_messages.C_STORE_RQ)
                msg.data_set = primitive.DataSet
            else:
                msg = dimse_messages.C_STORE_RSP.__new__(dimse_messages.C_STORE_RSP)
                msg.data_set = BytesIO()
            msg.command_set = _EncodedCommand(command)  # type: ignore[assignment]
            msg.context_id = context_id
            msg._data_set_path = getattr(primitive, "_dataset_path", None)
            msg._data_set_file = None
            with deadline(self):
                for pdata in msg.encode_msg(context_id, self.maximum_pdu_size):
                    self.dul.send_pdu(pdata)
            return
    with deadline(self):
        _orig_send_msg(self, primitive, context_id)


def install(direct: bool) -> None:
    """Replace ``send_msg`` (the DIMSE timeout on the send queue); with ``direct``, also
    encode command sets with this module's encoders."""
    global _direct
    _direct = direct
    if direct:
        dimse_messages.encode = encode_command_set  # type: ignore[assignment]
    DIMSEServiceProvider.send_msg = _dimse_send_msg  # type: ignore[method-assign]
