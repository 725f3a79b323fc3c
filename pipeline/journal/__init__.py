"""The instance journal: the history of every image, beside the spool that is its truth.

``run/journal.sqlite`` (SQLite, WAL) gets one row per event of an instance — received,
routed, shaped, sent, failed … (:mod:`events`) — from every daemon, each through its
own :class:`~pipeline.journal.writer.Journal` (a thread that writes batches off the
data path). ``dicomflow trace`` reads an instance's or a study's timeline from it and
``dicomflow reconcile`` crosses it with the spool's stages (README, The journal).
"""

from pipeline.journal.writer import Journal, NoJournal, for_daemon

__all__ = ["Journal", "NoJournal", "for_daemon"]
