"""pipeline.progress: a refreshed line on a terminal, plain lines elsewhere; and
``dicomflow retry --all`` using it (issue 18, item 4). A fake clock: no sleeps."""

from __future__ import annotations

import io

from pipeline.progress import PLAIN_INTERVAL, Progress
from tests.helpers import run_cli
from tests.journal_kit import make_spool, put


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_every_n_items_or_every_few_seconds() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress("rows", 250, every=100, stream=out, tty=False, clock=clock)
    for _ in range(99):
        progress.advance()
    assert out.getvalue() == ""
    progress.advance()
    assert out.getvalue() == "rows: 100 of 250 (40%)\n"
    clock.now += PLAIN_INTERVAL
    progress.advance()  # one item, but 5 s since the last line
    assert out.getvalue().splitlines()[-1] == "rows: 101 of 250 (40%)"
    progress.finish()
    assert "\r" not in out.getvalue()


def test_one_line_rewritten_on_a_terminal_at_most_ten_times_a_second() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress("files", None, stream=out, tty=True, clock=clock)
    for _ in range(500):  # no time passes: nothing is drawn
        progress.advance()
    assert out.getvalue() == ""
    clock.now += 0.1
    progress.advance()
    clock.now += 0.1
    progress.advance(1000)
    assert out.getvalue() == "\rfiles: 501\rfiles: 1,501"
    progress.finish()
    assert out.getvalue().endswith("\r" + " " * len("files: 1,501") + "\r")
    assert "\n" not in out.getvalue()


def test_retry_all_moves_every_file_and_stays_quiet_when_short(tmp_path) -> None:
    conf, spool = make_spool(tmp_path, endpoints=("pacs",))
    for n in range(3):
        put(spool, "failed/pacs", f"20261203T000000.00000{n}-00000{n}-1.2.{n}.dcm", reason="x")
    result = run_cli(conf, "retry", "pacs", "--all")
    assert result.returncode == 0, result.stderr
    assert "3 file(s) moved back" in result.stdout
    assert "retry pacs: files" not in result.stderr  # not a TTY, few files: no progress line
    assert len(list((spool.root / "outbox" / "pacs").glob("*.dcm"))) == 3
