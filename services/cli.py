"""The ``dicomflow`` command: one entry point for the daemons and the operator tools.

``dicomflow [--conf DIR] COMMAND …`` — ``--conf`` may also follow the command; it
defaults to ``$DICOMFLOW_CONF``, else ``./conf``. The configuration is loaded and
validated here, once, before any daemon starts (a mistake exits 1 with one line).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline import config as config_module
from pipeline.errors import AlreadyRunning, ConfigError, SpoolError

EPILOG_CONF = "The configuration directory defaults to $DICOMFLOW_CONF, else ./conf."


def _conf_argument(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--conf", metavar="DIR", default=default,
        help="configuration directory (router.ini, endpoints/); default $DICOMFLOW_CONF or ./conf",
    )


def _command(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_: str,
             example: str, note: str = "") -> argparse.ArgumentParser:
    parser = sub.add_parser(
        name, help=help_, description=help_,
        epilog=f"example:\n  {example}\n\n{EPILOG_CONF}{note}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _conf_argument(parser, argparse.SUPPRESS)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomflow",
        description="DicomFlow: a store-and-forward DICOM router.",
        epilog=EPILOG_CONF,
    )
    _conf_argument(parser, None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    receive = _command(sub, "receive", "run the C-STORE receiver daemon",
                       "dicomflow receive --conf /etc/dicomflow")
    receive.add_argument("--process", type=int, metavar="K", default=None,
                         help="which of the [router] receive_processes = N processes this is "
                              "(1..N; needed when N > 1, as supervisord starts them)")
    _command(sub, "filter", "run the filter / fan-out daemon", "dicomflow filter --conf /etc/dicomflow")
    send = _command(sub, "send", "run the sender daemon of one endpoint", "dicomflow send pacs")
    send.add_argument("endpoint", help="endpoint name (conf/endpoints/NAME.ini)")
    up = _command(sub, "up", "start the whole pipeline under supervisord (or apply endpoint changes)",
                  "dicomflow up --conf /etc/dicomflow")
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for RUNNING")
    up.add_argument("--force", action="store_true",
                    help="take the spool over from another conf directory (stops its router)")
    down = _command(sub, "down", "stop the pipeline and its supervisord", "dicomflow down")
    down.add_argument("--force", action="store_true",
                      help="stop it even if the spool belongs to another conf directory")
    status = _command(sub, "status", "show every stage and endpoint", "dicomflow status --json",
                      note="\n\nexit status: 0 when every daemon that should run does (receive, filter,"
                           "\na sender per endpoint, web when enabled), 3 when none does (the router is"
                           "\nstopped), 4 when some do and some do not, 1 on a configuration error.")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                        help="show it again every SECONDS (default 2), in place on a terminal; "
                             "Ctrl-C stops")
    retry = _command(sub, "retry", "move failed files of an endpoint back to its outbox",
                     "dicomflow retry pacs --all")
    retry.add_argument("endpoint")
    group = retry.add_mutually_exclusive_group(required=True)
    group.add_argument("--all", action="store_true", help="every file in failed/ENDPOINT")
    group.add_argument("files", nargs="*", default=[], help="file names (or paths) in failed/ENDPOINT")
    studies = _command(sub, "studies", "list studies waiting for completion and studies queued for sending",
                       "dicomflow studies --endpoint ai",
                       note="\n\nPatient data is shown only with --show-phi "
                            "(read from one file of each study).")
    which = studies.add_mutually_exclusive_group()
    which.add_argument("--waiting", action="store_true", help="only studies waiting for completion")
    which.add_argument("--endpoint", metavar="EP", help="only the studies of endpoint EP")
    studies.add_argument("--show-phi", action="store_true",
                         help="also show patient name and ID, study date and accession (patient data!)")
    studies.add_argument("--json", action="store_true", help="machine-readable output")
    release = _command(sub, "release", "release a waiting study now (do not wait for its completion)",
                       "dicomflow release 1.2.826.0.1.3680043.8.498.1",
                       note="\n\nexit status: 0 once the filter has released it, 1 when it is not waiting,"
                            "\nunknown, or the filter did not act within 30 s (the request then stays).")
    release.add_argument("study_uid", metavar="STUDY_UID", help="the Study Instance UID (dicomflow studies)")
    release.add_argument("--force", action="store_true",
                         help="write the request even if the filter's state does not list "
                              "the study as waiting")
    release.add_argument("--no-wait", action="store_true",
                         help="return once the request is written, without waiting for the filter")
    _command(sub, "web", "run the web daemon: /metrics, /healthz, the status page ([web] in router.ini)",
             "dicomflow web --conf /etc/dicomflow")
    _command(sub, "check", "validate the configuration", "dicomflow check --conf ./conf")
    echo = _command(sub, "echo", "C-ECHO an endpoint", "dicomflow echo pacs")
    echo.add_argument("endpoint")
    route = _command(sub, "route", "dry run: where would these files go, or which rule rejects them",
                     "dicomflow route study/*.dcm   |   dicomflow route --study study/",
                     note="\n\nexit status: 0 when every file got a decision (a quarantine verdict included),"
                          "\n1 when some file could not be read at all (missing, permission denied).")
    route.add_argument("files", nargs="*", type=Path)
    route.add_argument("--study", type=Path, metavar="DIR",
                       help="decide every series/study-level endpoint over the files under DIR, "
                            "grouped as the filter groups them")
    route.add_argument("--diff", action="store_true",
                       help="also show, per endpoint, what shaping would add, change and remove")
    route.add_argument("--show-values", action="store_true",
                       help="with --diff: the old and new values too (patient data!)")
    route.add_argument("--write", type=Path, metavar="DIR",
                       help="write each endpoint's shaped copy to DIR/<endpoint>/ for inspection")
    trace = _command(sub, "trace", "the story of an image or a study: where it came from, went, is now",
                     "dicomflow trace 1.2.826.0.1.3680043.8.498.1   |   dicomflow trace failed/pacs/FILE",
                     note="\n\nUID: a SOP Instance UID (one image) or a Study Instance UID (every image of"
                          "\nthe study). FILE: a spool file (its UID from its name) or any DICOM file."
                          "\nexit status: 0 when something is known, 1 when neither the journal nor the"
                          "\nspool knows it, 2 on a usage error.")
    trace.add_argument("target", nargs="?", metavar="UID|FILE")
    look_up = trace.add_mutually_exclusive_group()
    look_up.add_argument("--patient-id", metavar="ID",
                         help="every image of this Patient ID (needs [router] journal_phi = true)")
    look_up.add_argument("--accession", metavar="NUMBER",
                         help="every image of this Accession Number (needs journal_phi = true)")
    trace.add_argument("--json", action="store_true", help="machine-readable output")
    reconcile = _command(sub, "reconcile", "check that every acknowledged image is delivered, "
                         "failed, queued or rejected",
                         "dicomflow reconcile --since 7d --acknowledged storescu-acked.txt",
                         note="\n\nexit status: 0 when every instance is accounted for, 1 when some is not"
                              "\n(listed), 2 on a usage error (--since, --acknowledged).")
    reconcile.add_argument("--since", default="24h", metavar="DURATION",
                           help="the window: images acknowledged this long ago or later (90m, 24h, 7d)")
    reconcile.add_argument("--acknowledged", type=Path, metavar="FILE",
                           help="SOP Instance UIDs the senders were told were stored, one a line")
    reconcile.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def conf_dir(args: argparse.Namespace) -> Path:
    value = getattr(args, "conf", None) or os.environ.get("DICOMFLOW_CONF") or "conf"
    return Path(value)


def _load(args: argparse.Namespace) -> config_module.Config:
    return config_module.load(conf_dir(args))


def _load_owned(args: argparse.Namespace) -> config_module.Config:
    """For the daemons and commands that change the spool: its owner conf dir only.

    A daemon started by hand claims a spool nobody owns yet (as ``up`` does).
    """
    from pipeline import owner
    from pipeline.spool import Spool

    config = _load(args)
    owner.claim(Spool(config.spool).create(), config.conf_dir)
    return config


def _cmd_check(args: argparse.Namespace) -> int:
    from services.check import check

    return check(_load(args))


def _cmd_receive(args: argparse.Namespace) -> int:
    from services.receive import main

    return main(_load_owned(args), args.process)


def _cmd_filter(args: argparse.Namespace) -> int:
    from services.filter import main

    return main(_load_owned(args))


def _cmd_send(args: argparse.Namespace) -> int:
    from services.send import main

    return main(_load_owned(args), args.endpoint)


def _cmd_route(args: argparse.Namespace) -> int:
    if args.study is not None:
        if args.files or args.diff or args.show_values or args.write:
            print("dicomflow route: --study DIR takes no files, --diff, --show-values or --write",
                  file=sys.stderr)
            return 2
        from services.route_study import main as study_main

        return study_main(_load(args), args.study)
    if not args.files:
        print("dicomflow route: give FILE… or --study DIR", file=sys.stderr)
        return 2
    from services.route import main

    return main(_load(args), args.files, diff=args.diff or args.show_values,
                show_values=args.show_values, write=args.write)


def _cmd_echo(args: argparse.Namespace) -> int:
    from services.echo import main

    return main(_load(args), args.endpoint)


def _cmd_status(args: argparse.Namespace) -> int:
    from pipeline import owner
    from pipeline.errors import SpoolError
    from pipeline.spool import Spool
    from services.status import main

    config = _load(args)
    try:
        owner.check(Spool(config.spool), config.conf_dir)
    except SpoolError as exc:  # still show it: an operator needs to see whose spool it is
        print(f"dicomflow: warning: {exc}", file=sys.stderr)
    if args.watch is not None and not 0 < args.watch <= 3600:  # nan fails both
        print("dicomflow status: --watch takes 0 < SECONDS <= 3600", file=sys.stderr)
        return 2
    return main(config, as_json=args.json, watch=args.watch)


def _cmd_web(args: argparse.Namespace) -> int:
    from services.web import main

    return main(_load(args))


def _cmd_studies(args: argparse.Namespace) -> int:
    from services.studies import studies_main

    return studies_main(_load(args), waiting=args.waiting, endpoint=args.endpoint,
                        show_phi=args.show_phi, as_json=args.json)


def _cmd_release(args: argparse.Namespace) -> int:
    from services.studies import release_main

    return release_main(_load_owned(args), args.study_uid, force=args.force, wait=not args.no_wait)


def _cmd_retry(args: argparse.Namespace) -> int:
    from services.retry import main

    return main(_load_owned(args), args.endpoint, args.files, retry_all=args.all)


def _cmd_trace(args: argparse.Namespace) -> int:
    if (args.target is None) == (args.patient_id is None and args.accession is None):
        print("dicomflow trace: give UID|FILE, or --patient-id / --accession (not both)",
              file=sys.stderr)
        return 2
    from services.trace import main

    return main(_load(args), args.target, as_json_output=args.json, patient_id=args.patient_id,
                accession=args.accession)


def _cmd_reconcile(args: argparse.Namespace) -> int:
    from services.reconcile import main

    return main(_load(args), args.since, args.acknowledged, as_json=args.json)


def _cmd_up(args: argparse.Namespace) -> int:
    from services.supervise import up

    return up(_load(args), timeout=args.timeout, force=args.force)


def _cmd_down(args: argparse.Namespace) -> int:
    from services.supervise import down

    return down(_load(args), force=args.force)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "check": _cmd_check,
    "receive": _cmd_receive,
    "filter": _cmd_filter,
    "send": _cmd_send,
    "route": _cmd_route,
    "echo": _cmd_echo,
    "status": _cmd_status,
    "web": _cmd_web,
    "retry": _cmd_retry,
    "studies": _cmd_studies,
    "release": _cmd_release,
    "trace": _cmd_trace,
    "reconcile": _cmd_reconcile,
    "up": _cmd_up,
    "down": _cmd_down,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"dicomflow: configuration error: {exc}", file=sys.stderr)
        return 1
    except (SpoolError, AlreadyRunning) as exc:
        print(f"dicomflow: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
