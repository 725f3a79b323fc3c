"""Synthetic journals and spools for the trace / reconcile tests.

Events are written through the real writer (:class:`Journal`, flushed by hand) with
exactly the fields the daemons write (the event contract of issue 18); files are put
in the stages where the daemons leave them, named as the spool names them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.journal import Journal, store
from pipeline.spool import Spool
from pipeline.spool_names import SpoolName
from tests.helpers import write_conf

PACS_ENDPOINT = {"endpoint": {"ae_title": "PACS", "host": "127.0.0.1", "port": 11112}}


def make_spool(tmp_path: Path, endpoints: tuple[str, ...] = ("pacs", "ai", "research"),
               phi: bool = False) -> tuple[Path, Spool]:
    router = {"journal_phi": "true"} if phi else {}
    conf = write_conf(tmp_path, router=router,
                      endpoints={name: PACS_ENDPOINT for name in endpoints})
    spool = Spool(tmp_path / "spool").create(endpoints)
    return conf, spool


def journal(spool: Spool, daemon: str = "test", phi: bool = False) -> Journal:
    return Journal(store.journal_path(spool.run_dir), daemon, phi=phi)


def put(spool: Spool, relative: str, name: str, reason: str | None = None) -> Path:
    """A file (a few bytes: nothing here reads headers) at ``<stage>[/<ep>]/<name>``."""
    path = spool.root / relative / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"DICM")
    if reason is not None:
        suffix = ".error" if relative.startswith("failed") else ".reason"
        path.with_name(name + suffix).write_text(reason + "\n")
    return path


@dataclass
class Arrival:
    """One received image: its UID, its spool name, and its events written as asked."""

    uid: str
    name: SpoolName
    study: str = "1.2.3"
    series: str = "1.2.3.4"

    @classmethod
    def new(cls, uid: str, study: str = "1.2.3", now: float | None = None) -> Arrival:
        return cls(uid, SpoolName.new(uid, now), study, study + ".4")

    @property
    def file(self) -> str:
        return str(self.name)

    def copy(self, uid: str) -> str:
        """The name of a copy under another UID (de-identified): the same prefix."""
        return f"{self.name.prefix}-{uid}.dcm"

    def received(self, j: Journal) -> None:
        j.record("received", uid=self.uid, file=self.file, calling="CT1", called="DICOMFLOW",
                 peer="127.0.0.1:40000", sop_class="1.2.840.10008.5.1.4.1.1.2",
                 syntax="1.2.840.10008.1.2.1", size=1234, association=7)

    def routed(self, j: Journal, endpoints: list[str], waiting: list[str] | None = None,
               refused: dict[str, str] | None = None, **extra: object) -> None:
        j.record("routed", uid=self.uid, file=self.file, study=self.study, series=self.series,
                 patient_id="PID-SECRET", accession="ACC-SECRET", endpoints=endpoints,
                 waiting=waiting or [], refused=refused or {},
                 sop_class="1.2.840.10008.5.1.4.1.1.2", **extra)

    def sent(self, j: Journal, endpoint: str, uid: str | None = None, status: int = 0) -> None:
        uid = uid or self.uid
        j.record("sent", uid=uid, file=self.copy(uid), endpoint=endpoint, status=status,
                 duration=0.05, association="PACS@127.0.0.1:11112")


def damage(spool: Spool) -> None:
    """Overwrite every page of the (closed, checkpointed) journal but the first: its
    schema still reads, its events do not ("database disk image is malformed")."""
    path = store.journal_path(spool.run_dir)
    size = path.stat().st_size
    assert size > 3 * PAGE, "write more events first"
    with open(path, "r+b") as f:
        f.seek(PAGE)
        f.write(b"\xa5" * (size - PAGE))


PAGE = 4096  # SQLite's default page size
