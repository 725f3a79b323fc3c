"""The filter's shaping: the global ``[coerce]`` in ``accepted/``, an endpoint's own copy.

* **Global** (router.ini ``[coerce]``): the coerced version of a file in ``accepted/``
  replaces it there atomically (:meth:`Spool.replace`), before any copy is made; a file
  this spool coerced already (its file meta says so, :mod:`provenance`) is left as it
  is, so a redo after a crash never coerces twice.
* **Per endpoint** (``conf/endpoints/<name>.ini`` ``[coerce]``): the endpoint gets its
  own file, written through the spool straight into its outbox (hidden temp → fsync →
  rename → directory fsync), named with the received file's ``<time>-<counter>`` prefix
  and the copy's SOP Instance UID, marked in its file meta as shaped for that endpoint
  (:mod:`pipeline.shaping.provenance`).

The endpoint copy's temp file is in ``outbox/<endpoint>/.tmp/filter/`` (the sender cleans
its own temp files at start-up, never that folder's; the filter does).

Errors: :class:`~pipeline.errors.ShapingError` (this file cannot be shaped: the caller
sends it to ``failed/`` or ``quarantine/`` with the reason), ``OSError`` (the disk: the
caller retries later); a half-written copy is never visible.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydicom.dataset import Dataset

from pipeline.config import Config, EndpointConfig
from pipeline.shaping import provenance
from pipeline.shaping.burned_in import check_burned_in
from pipeline.shaping.deidentify import Deidentifier, DeidentifyThenCoerce
from pipeline.shaping.rewrite import Plan, ShapingSource
from pipeline.spool import Spool
from pipeline.spool_names import SpoolName

T = TypeVar("T")

#: the filter's temp folder in an outbox: ``outbox/<endpoint>/.tmp/filter/``
TMP_OWNER = "filter"


class Shaper:
    """Shaping bound to one configuration and spool (no globals)."""

    def __init__(self, config: Config, spool: Spool) -> None:
        self.config = config
        self.spool = spool
        self._spool_id: str | None = None
        self._deidentifiers: dict[str, Deidentifier] = {}

    @property
    def spool_id(self) -> str:
        if self._spool_id is None:
            self._spool_id = self.spool.instance_id()
        return self._spool_id

    @property
    def global_system(self) -> str:
        return provenance.modifying_system(self.config.router.ae_title, None)

    def endpoint_system(self, endpoint: str) -> str:
        return provenance.modifying_system(self.config.router.ae_title, endpoint)

    def coerced_here(self, meta: Dataset) -> bool:
        """Was this file (its pydicom file meta) already coerced by our global stage?"""
        return provenance.coerced_here(provenance.meta_values(meta), self.spool_id)

    def coerce_global(self, accepted: Path, decide: Callable[[Dataset], T]) -> T | None:
        """Apply router.ini's ``[coerce]`` to ``accepted/<name>`` — a file the caller
        found not :meth:`coerced_here` already; ``decide`` is called with the coerced
        header while the file is still open (a value it reads may be deferred), and its
        answer returned. None when nothing changed."""
        operations = self.config.router.coerce
        if not operations:
            return None
        with ShapingSource.open(accepted, self.config.router.header_limits,
                                self.spool.tmp_dir(self.spool.accepted)) as source:
            plan = source.plan(operations, self.global_system)
            if not plan.changed:
                return None
            decision = decide(source.dataset)
            with self.spool.temp_file(self.spool.accepted) as tmp:
                plan.write(tmp.file.fileno(), provenance.coerced_mark(self.spool_id))
            self.spool.replace(tmp.path, accepted)
            return decision

    def endpoint_copy(self, path: Path, endpoint: str) -> Path:
        """Write ``endpoint``'s shaped copy of ``path`` into its outbox; its path."""
        outbox = self.spool.outbox(endpoint)
        ep = self.config.endpoints[endpoint]
        tmp_dir = self.spool.process_tmp_dir(outbox, TMP_OWNER)
        with ShapingSource.open(path, self.config.router.header_limits, tmp_dir) as source:
            plan = plan_endpoint_copy(source, ep, self.endpoint_system(endpoint),
                                      self._deidentifier(ep))
            with self.spool.temp_file(outbox, tmp_dir) as tmp:
                plan.write(tmp.file.fileno(), provenance.shaped_mark(endpoint))
            return self._publish(tmp.path, outbox, path.name, plan)

    def _deidentifier(self, ep: EndpointConfig) -> Deidentifier | None:
        """The endpoint's de-identifier, built once (its table resolved for its options)."""
        if ep.deidentify is None:
            return None
        if ep.name not in self._deidentifiers:
            self._deidentifiers[ep.name] = Deidentifier(ep.deidentify)
        return self._deidentifiers[ep.name]

    def _publish(self, tmp_path: Path, outbox: Path, received_name: str, plan: Plan) -> Path:
        """Under the received file's prefix and the copy's UID; a fresh name on a clash."""
        uid = plan.sop_instance_uid or None
        parsed = SpoolName.parse(received_name)
        if parsed is None:
            return self.spool.publish_new(tmp_path, outbox, uid)
        try:
            return self.spool.publish(tmp_path, outbox, str(SpoolName(parsed.time, parsed.counter,
                                                                      uid)))
        except FileExistsError:
            return self.spool.publish_new(tmp_path, outbox, uid)


def plan_endpoint_copy(source: ShapingSource, ep: EndpointConfig, system: str,
                       deidentifier: Deidentifier | None = None) -> Plan:
    """What ``ep``'s copy of ``source`` gets: its ``[coerce]``, or — when it de-identifies —
    the burned-in check, Table E.1-1, then its ``[coerce]``, with no Original Attributes
    and the file meta rebuilt from an allow-list. ShapingError when it cannot be shaped."""
    if ep.deidentify is None:
        return source.plan(ep.coerce or None, system)
    if not ep.deidentify.allow_burned_in:
        check_burned_in(source.dataset, source.meta)
    deidentifier = deidentifier or Deidentifier(ep.deidentify)
    plan = source.plan(DeidentifyThenCoerce(deidentifier, ep.coerce or None), system,
                       keep_originals=False)
    plan.meta_changes = deidentifier.meta_changes(source.meta, source.dataset)
    plan.meta_keep = deidentifier.meta_keep()
    return plan


def copy_prefix(name: str) -> str | None:
    """The ``<time>-<counter>`` every copy of one arrival shares (None: not a standard name)."""
    parsed = SpoolName.parse(name)
    return None if parsed is None else parsed.prefix

