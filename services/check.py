"""``dicomflow check``: validate the configuration and report what it found."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.spool import Spool


def check(config: Config) -> int:
    """Print a summary of a configuration that loaded; warnings do not fail the check."""
    router = config.router
    print(f"configuration {config.conf_dir}: OK")
    print(f"  receiver {router.ae_title} on {router.bind}:{router.port}, spool {router.spool}")
    print(f"  receiver TLS: {router.tls.describe(server=True)}")
    web = router.web
    if web.enabled:
        auth = f"basic auth from {web.auth_file}" if web.auth_file else "no auth"
        print(f"  web: {web.scheme}://{web.bind}:{web.port} ({auth}; /healthz always open)")
    if router.coerce:
        print(f"  global [coerce]: {len(router.coerce.lines)} operation(s), before fan-out")
    for name, ep in sorted(config.endpoints.items()):
        window = ep.window.describe()
        print(f"  endpoint {name}: {ep.ae_title}@{ep.host}:{ep.port}, window {window}")
        if ep.tls.enabled:
            print(f"  endpoint {name} TLS: {ep.tls.describe(server=False)}")
        if ep.deidentify is not None:
            options = ", ".join(sorted(ep.deidentify.options)) or "no options"
            burned = "sent" if ep.deidentify.allow_burned_in else "refused"
            print(f"  endpoint {name} [deidentify]: basic profile ({options}); files that may "
                  f"show identity in their pixels: {burned}")
        if ep.study.grouped:
            policy = ep.study
            print(f"  endpoint {name}: decides per {policy.level}, complete by {policy.completion} "
                  f"(stable_time {policy.stable_time:g}s, max_wait {policy.max_wait:g}s), late "
                  f"instances {policy.late}")
        if ep.coerce:
            print(f"  endpoint {name} [coerce]: {len(ep.coerce.lines)} operation(s), "
                  f"its own shaped copy")
    warnings = list(config.warnings)
    spool = Spool(router.spool)
    for orphan in sorted(set(spool.endpoints()) - set(config.endpoints)):
        warnings.append(
            f"endpoint {orphan} has an outbox in the spool but no conf/endpoints/{orphan}.ini "
            "(orphaned: its files will not be sent)"
        )
    for warning in warnings:
        print(f"warning: {warning}")
    return 0
