"""A minimal stock pynetdicom C-STORE SCP: the "one Python hop" row of the benchmark.

Chunked receive (the dataset streams to a temp file) and TCP_NODELAY (README, Design notes),
and nothing else: each received file is renamed into the output folder
(no fsync, like DCMTK's storescp). Usage: ``python -m tests.bench.pynetdicom_scp PORT DIR``.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    port, out = int(args[0]), Path(args[1])
    tmp = out / ".tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(tmp)
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    counter = iter(range(10**9))

    def on_open(event: evt.Event) -> None:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_store(event: evt.Event) -> int:
        os.rename(event.dataset_path, out / f"{next(counter):06d}.dcm")
        return 0x0000

    ae = AE(ae_title="PYNETDICOM")
    ae.maximum_pdu_size = 1024 * 1024
    ae.add_supported_context(Verification)
    ae.start_server(("127.0.0.1", port), block=True,
                    evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_C_STORE, on_store)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
