"""The receiver alone under concurrent senders: ``[router] receive_processes`` 1 vs N.

    python -m tests.bench.receive_processes --count 400 --senders 8 --processes 1,2 --rounds 3

``--senders`` DCMTK ``storescu`` start at once, each sending its share of ``--count``
0.5 MB CT images (one study each) to ``dicomflow receive`` run as each of
``--processes`` (rounds interleaved: every variant once per round, in turn). The rate
is all images over the time from the first start to the last ``storescu`` exiting —
each image acknowledged, so durable in ``incoming/``; CPU is user + system of the
receive processes (``/proc``). No filter, no sender: this is the receive hop only
(issue 13, item 5). Not part of the tests; a separate module so that ``run.py`` and
its knobs stay as they are.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.run import cpu_seconds, int_list, make_studies, median, storescu_all
from tests.helpers import Daemon, router_port, wait_port, write_conf

CALLED = "DICOMFLOW"
WARM_UP = 10  # untimed images per sender before the timed ones (the daemons are warm)


class Receivers:
    """``receive_processes`` receive daemons on one port, nothing else."""

    def __init__(self, base: Path, processes: int) -> None:
        self.base = base / f"receive-{processes}-{time.monotonic_ns()}"
        self.base.mkdir(parents=True)
        self.conf = write_conf(self.base, router={"log_level": "WARNING",
                                                  "receive_processes": processes})
        self.port = router_port(self.conf)
        self.incoming = self.base / "spool" / "incoming"
        args = [("receive",)] if processes == 1 else \
            [("receive", "--process", str(k)) for k in range(1, processes + 1)]
        self.daemons = [Daemon(self.conf, *a, log_name="-".join(a)) for a in args]

    def start(self) -> Receivers:
        for daemon in self.daemons:
            daemon.start()
        wait_port(self.port)
        time.sleep(2.0)  # every process bound (they log at WARNING only)
        assert all(d.alive() for d in self.daemons), [d.log()[-1000:] for d in self.daemons]
        return self

    def cpu(self) -> float:
        return sum(cpu_seconds(d.pid) for d in self.daemons)

    def clear_incoming(self) -> None:
        for path in self.incoming.iterdir():
            if path.is_file():
                path.unlink()

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def measure(receivers: Receivers, sets: list[list[Path]], warm: list[list[Path]]) -> tuple[float, float]:
    """(images/s, CPU ms per image) of one round."""
    storescu_all(receivers.port, warm, CALLED)
    receivers.clear_incoming()
    count = sum(len(s) for s in sets)
    cpu0, start = receivers.cpu(), time.monotonic()
    storescu_all(receivers.port, sets, CALLED)
    elapsed, cpu = time.monotonic() - start, receivers.cpu() - cpu0
    stored = sum(1 for p in receivers.incoming.iterdir() if p.is_file())
    if stored != count:
        raise RuntimeError(f"{stored} of {count} images in incoming/")
    receivers.clear_incoming()
    return count / elapsed, cpu / count * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=400, help="images per round (all senders)")
    parser.add_argument("--senders", type=int, default=8, help="storescu at once")
    parser.add_argument("--processes", type=int_list, default=[1, 2], help="e.g. 1,2,3")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=512, help="image rows = columns (512: 0.5 MB)")
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="dicomflow-bench-rp-"))
    try:
        sets = [s.files for s in make_studies(base / "data", args.count, args.senders, args.size)]
        warm = [s.files for s in make_studies(base / "warm", WARM_UP * args.senders,
                                              args.senders, args.size)]
        running = {n: Receivers(base, n).start() for n in args.processes}
        results: dict[int, list[tuple[float, float]]] = {n: [] for n in args.processes}
        for round_ in range(args.rounds):
            for n, receivers in running.items():
                rate, cpu = measure(receivers, sets, warm)
                results[n].append((rate, cpu))
                print(f"round {round_ + 1}: {n} process(es): {rate:.0f} images/s, "
                      f"{cpu:.2f} ms CPU/image", file=sys.stderr)
        for receivers in running.values():
            receivers.stop()
        print(f"| receive processes | images/s ({args.count} images, {args.senders} storescu "
              f"at once; median of {args.rounds}) | CPU ms/image | rounds (images/s) |")
        print("|---:|---:|---:|---|")
        for n, values in results.items():
            rates = [r for r, _ in values]
            print(f"| {n} | {median(rates):.0f} | {median([c for _, c in values]):.2f} | "
                  f"{', '.join(f'{r:.0f}' for r in rates)} |")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
