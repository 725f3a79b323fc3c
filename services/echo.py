"""``dicomflow echo ENDPOINT``: C-ECHO a destination and say plainly what went wrong.

Uses the endpoint's own settings (calling/called AE titles, timeouts, TLS), so a
success here means the sender can associate too. The failure is named the way an
integration engineer debugs it: connection refused, timeout, TLS failure, association
rejected (with the peer's reason), aborted, or a failure status. No bare TCP connection
is opened first: some destinations (CTN's ``simple_storage``) exit on one. Every wait is
bounded by the endpoint's timeouts, the release included.
"""

from __future__ import annotations

import sys

from pipeline.config import Config
from pipeline.dicom import patches
from pipeline.dicom import scu as net
from pipeline.statuses import describe


def echo(config: Config, endpoint: str) -> tuple[bool, str]:
    """(ok, message) for one C-ECHO to ``endpoint``."""
    ep = config.endpoints[endpoint]
    where = f"{ep.ae_title}@{ep.host}:{ep.port}"
    outcome = net.echo(ep, ep.calling_ae_title)
    if outcome.verification_refused:
        return False, f"{where} accepted the association but not the Verification SOP class"
    if outcome.failure is not None:
        return False, outcome.failure
    if outcome.status is None:
        return False, f"no C-ECHO response from {where} (timeout or abort)"
    if outcome.status != 0:
        return False, f"C-ECHO to {where} answered {describe(outcome.status)}"
    return True, f"C-ECHO to {where} succeeded (calling AE {ep.calling_ae_title})"


def main(config: Config, endpoint: str) -> int:
    if endpoint not in config.endpoints:
        known = ", ".join(sorted(config.endpoints)) or "none"
        print(f"dicomflow: unknown endpoint {endpoint!r} (configured: {known})", file=sys.stderr)
        return 1
    patches.install("echo")
    ok, message = echo(config, endpoint)
    print(message if ok else f"dicomflow: echo {endpoint}: {message}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1
