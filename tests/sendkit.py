"""Helpers for the sender's tests: filling an outbox, an in-process pynetdicom SCP that
answers chosen statuses, and reading the sender's state files."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from pipeline.spool import Spool
from tests.helpers import free_port, write_conf

STORAGE_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.2",      # CT
    "1.2.840.10008.5.1.4.1.1.4",      # MR
    "1.2.840.10008.5.1.4.1.1.7",      # Secondary Capture
]


def endpoint_conf(tmp_path: Path, endpoints: dict[str, dict], **router) -> Path:
    """``write_conf`` with endpoints given as {name: {"port": …, "ae_title": …, section: …}}."""
    full = {}
    for name, values in endpoints.items():
        values = dict(values)
        sections = {k: values.pop(k) for k in list(values) if isinstance(values[k], dict)}
        endpoint = {"host": "127.0.0.1", "idle_release": "2s", "dimse_timeout": "30s",
                    "connect_timeout": "5s", **values}
        full[name] = {"endpoint": endpoint, **sections}
    return write_conf(tmp_path, router=router or None, endpoints=full)


def put_in_outbox(spool_root: Path, endpoint: str, files: Iterable[Path]) -> list[Path]:
    """Publish copies of ``files`` into ``outbox/<endpoint>/`` the way the filter does
    (temp file, fsync, atomic rename under a standard name)."""
    spool = Spool(spool_root).create([endpoint])
    outbox = spool.outbox(endpoint)
    published = []
    for path in files:
        uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
        with spool.temp_file(outbox) as tmp:
            tmp.file.write(Path(path).read_bytes())
        published.append(spool.publish_new(tmp.path, outbox, str(uid)))
    return published


def read_state(spool_root: Path, endpoint: str) -> dict:
    try:
        return json.loads((spool_root / "run" / f"send-{endpoint}.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def read_retry(spool_root: Path, endpoint: str) -> dict:
    try:
        return json.loads((spool_root / "run" / f"retry-{endpoint}.json").read_text())["files"]
    except (FileNotFoundError, ValueError, KeyError):
        return {}


class StatusSCP:
    """A pynetdicom Storage SCP on loopback, in a thread, answering the statuses given
    in order (then ``default``); counts associations and records what it received."""

    def __init__(self, statuses: Iterable[int] = (), default: int = 0x0000,
                 transfer_syntaxes: list[str] | None = None, ae_title: str = "STATUSSCP",
                 sop_classes: list[str] | None = None, port: int | None = None,
                 ssl_context=None) -> None:
        self.ssl_context = ssl_context
        self.statuses = list(statuses)
        self.default = default
        self.port = port or free_port()
        self.ae_title = ae_title
        self.associations = 0
        self.received: list[tuple[str, str]] = []   # (SOP Instance UID, transfer syntax)
        self.lock = threading.Lock()
        self.ae = AE(ae_title=ae_title)
        self.ae.require_called_aet = True
        syntaxes = transfer_syntaxes or [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        for uid in sop_classes or STORAGE_CLASSES:
            self.ae.add_supported_context(uid, syntaxes)
        self.ae.add_supported_context(Verification)
        self.server = None

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        with self.lock:
            self.received.append((str(ds.SOPInstanceUID), str(event.context.transfer_syntax)))
            return self.statuses.pop(0) if self.statuses else self.default

    def _on_established(self, event: evt.Event) -> None:
        with self.lock:
            self.associations += 1

    def start(self) -> StatusSCP:
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_ESTABLISHED, self._on_established)]
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=handlers, ssl_context=self.ssl_context)
        return self

    def uids(self) -> list[str]:
        with self.lock:
            return [uid for uid, _ in self.received]

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def storescp_uids(directory: Path) -> list[str]:
    """SOP Instance UIDs of every file a DCMTK storescp wrote (duplicates kept)."""
    uids = []
    for path in sorted(directory.iterdir()):
        if path.is_file():
            uids.append(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
    return uids
