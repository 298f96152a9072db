"""``keyroute``: one command for every role of the image.

- ``keyroute operator``: the kopf operator that renders chains into sidecar configs and keeps status
- ``keyroute sidecar``: the proxy beside an agent (``--config`` rendered file, or ``--manifests`` local mode)
- ``keyroute demo``: the sidecar in front of two misbehaving fake providers, narrated live
- ``keyroute check``: validate manifests and show what a chain would route, without any key
- ``keyroute render``: write the sidecar config the operator would render from manifests
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keyroute import __version__
from keyroute.logs import setup_logging

if TYPE_CHECKING:  # the renderer brings pydantic, which `keyroute sidecar --config` never needs
    from keyroute.core.render import RenderResult
    from keyroute.kube import Credentials

log = logging.getLogger("keyroute")

#: Seconds in-flight requests and streams get after SIGTERM (``keyroute sidecar --shutdown-grace``).
#: Kubernetes kills a container ``terminationGracePeriodSeconds`` (30 s by default) after SIGTERM;
#: 20 s leaves room for the last reports, the process's own exit and a preStop hook the pod may have.
SHUTDOWN_GRACE = 20.0


def _run(coro: Coroutine[Any, Any, int], loop: str) -> int:
    if loop in ("auto", "uvloop"):
        try:
            import uvloop

            return int(uvloop.run(coro))
        except ImportError:
            if loop == "uvloop":
                raise
    return asyncio.run(coro)


async def _serve_sidecar(args: argparse.Namespace) -> int:
    from keyroute.core.config import ConfigError
    from keyroute.sidecar.app import Address, Sidecar
    from keyroute.sidecar.sources import ConfigSource, ManifestSource, RenderedConfigFile

    source: ConfigSource
    if args.config:
        source = RenderedConfigFile(Path(args.config))
    else:
        source = ManifestSource(Path(args.manifests), chain=args.chain, namespace=args.namespace)
    sidecar = Sidecar(
        source,
        listen=Address.parse(args.listen),
        admin_listen=Address.parse(args.admin_listen) if args.admin_listen != "off" else None,
        reload_interval=args.reload_interval,
        count_tokens=args.token_metrics == "on",
    )
    try:
        _setup_reporting(sidecar, args)
    except ValueError as e:
        log.error("cannot start: reporting is misconfigured", extra={"kr": {"error": str(e)}})
        return 2
    try:
        await sidecar.start()
    except (ConfigError, ValueError) as e:
        log.error(
            "cannot start: config is invalid", extra={"kr": {"source": source.describe(), "error": str(e)}}
        )
        return 2
    # Everything allocated so far (modules, config, chain) lives as long as the process: out of the
    # collector's way, so the collections that allocation on the request path triggers stay short.
    gc.collect()
    gc.freeze()
    stop, hurry = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        # The first signal starts the graceful shutdown; a second one cuts it short (Ctrl-C twice).
        (hurry if stop.is_set() else stop).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal)
    await stop.wait()
    await sidecar.shutdown(args.shutdown_grace, hurry)
    return 0


def _setup_reporting(sidecar: Any, args: argparse.Namespace) -> None:
    """``--report auto``: report when running in a cluster (a ServiceAccount token is mounted) or
    when ``--kubeconfig`` is given; ``on``: the same, but failing if neither is available."""
    if args.report == "off":
        return
    creds: Credentials | None = None
    if args.kubeconfig:  # loaded by the kubernetes client (exec plugins too): a bad one stops us here
        from keyroute.kube import Credentials

        creds = Credentials.kubeconfig(args.kubeconfig, args.context)
    elif args.context:
        raise ValueError("--context needs --kubeconfig")
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        # A pod's ServiceAccount: read here, without importing the kubernetes client. Outside a
        # cluster (no such variable: in_cluster() would say None) keyroute's API client is not even
        # imported, so a sidecar that only logs carries none of it (idle memory, issue 13).
        from keyroute.kube import Credentials, in_cluster

        conn = in_cluster()
        creds = Credentials.token_file(conn) if conn is not None else None
    if creds is None:
        if args.report == "on":
            raise ValueError("--report on needs a ServiceAccount token (in a pod) or --kubeconfig")
        log.info("not in a cluster and no --kubeconfig: recovery actions are logged, not reported")
        return
    import socket

    from keyroute.core.reports import Origin
    from keyroute.kube import SIDECAR_AGENT, Kube

    conn = creds.connection()
    pod = args.pod_name or os.environ.get("POD_NAME") or socket.gethostname()
    namespace = args.pod_namespace or os.environ.get("POD_NAMESPACE") or conn.namespace or "default"
    sidecar.enable_reporting(
        Kube(creds, user_agent=SIDECAR_AGENT),
        Origin(pod=pod, namespace=namespace),
        share_cooldowns=not args.no_share,
    )
    log.info(
        "reporting recovery actions as Events",
        extra={
            "kr": {
                "server": conn.server,
                "credentials": creds.describe,
                "pod": pod,
                "namespace": namespace,
                "share": not args.no_share,
            }
        },
    )


def _cmd_sidecar(args: argparse.Namespace) -> int:
    if bool(args.config) == bool(args.manifests):
        print("keyroute sidecar: give exactly one of --config FILE or --manifests PATH", file=sys.stderr)
        return 2
    setup_logging(args.log_level, args.log_format)
    return _run(_serve_sidecar(args), args.loop)


def _load_manifests(args: argparse.Namespace) -> RenderResult | None:
    """Render the manifests, or print why not (a key-free message) and return ``None``."""
    from keyroute.core.manifests import parse_manifests, render_manifests
    from keyroute.sidecar.manifest_files import read_manifest_texts

    try:
        texts = read_manifest_texts(Path(args.manifests))
        return render_manifests(parse_manifests(texts), args.chain, args.namespace)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def _cmd_check(args: argparse.Namespace) -> int:
    result = _load_manifests(args)
    if result is None:
        return 2
    cfg = result.config
    print(f"chain {cfg.chain.namespace}/{cfg.chain.name}: config hash {cfg.content_hash()}")
    for entry in cfg.entries:
        pool = next(p for p in cfg.pools if p.name == entry.pool)
        creds = ", ".join(f"{c.name} ({c.fingerprint})" for c in pool.credentials)
        print(
            f"  route  {entry.name:<16} {entry.provider:<12} {entry.base_url}  pool {pool.name} [{pool.strategy}]: {creds}"
        )
    for x in cfg.excluded:
        what = f"entry {x.entry}" if x.entry else f"credential {x.pool}/{x.credential}"
        print(f"  skip   {what}: {x.reason}: {x.message}")
    return 0 if cfg.entries else 1


def _cmd_render(args: argparse.Namespace) -> int:
    result = _load_manifests(args)
    if result is None:
        return 2
    # The output holds key values: it goes to a file, never to a terminal by default.
    out = Path(args.output)
    out.write_text(result.config.to_json())
    out.chmod(0o600)
    print(f"wrote {out} (hash {result.config.content_hash()}; contains keys, mode 0600)")
    return 0


def _flag_bool(text: str) -> bool:
    """Go-style boolean flag values (``--leader-elect=false``), as controller-runtime's."""
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def _seconds(text: str) -> float:
    """A duration flag: ``15s``, ``500ms``, ``1m`` or plain seconds (finite, never negative)."""
    from keyroute.core.durations import DurationError, parse_duration

    try:
        return parse_duration(text)
    except (DurationError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def operator_config(args: argparse.Namespace) -> Any:
    """The :class:`OperatorConfig` the flags describe; ``ValueError`` with the flag's name if invalid."""
    from keyroute.controller.election import ElectionConfig, default_identity, default_namespace
    from keyroute.controller.settings import OperatorConfig
    from keyroute.core.election import Timings

    election = None
    if args.leader_elect:
        namespace = args.leader_election_namespace or default_namespace()
        if not namespace:
            raise ValueError(
                "leader election needs a namespace for its Lease: set --leader-election-namespace or "
                "$POD_NAMESPACE (outside a cluster), or turn it off with --leader-elect=false"
            )
        timings = Timings(
            lease_duration=args.leader_elect_lease_duration,
            renew_deadline=args.leader_elect_renew_deadline,
            retry_period=args.leader_elect_retry_period,
        )
        election = ElectionConfig(
            name=args.leader_election_id, namespace=namespace, identity=default_identity(), timings=timings
        )
    resync = args.resync_interval
    if resync is None:
        resync = float(os.environ.get("KEYROUTE_RESYNC_SECONDS", "300"))
    if resync <= 0:
        raise ValueError("--resync-interval must be > 0")
    # Unset, the first retry is 5 s, or the resync interval if that is shorter (a test's 2 s).
    retry = min(5.0, resync) if args.retry_delay is None else args.retry_delay
    if retry <= 0:
        raise ValueError("--retry-delay must be > 0")
    if retry > resync:
        raise ValueError(f"--retry-delay ({retry:g}s) must not be longer than --resync-interval ({resync:g}s)")
    return OperatorConfig(
        namespaces=tuple(args.namespace or ()), resync=resync, retry_delay=retry, election=election
    )


def _cmd_operator(args: argparse.Namespace) -> int:
    from keyroute.kube import Credentials, KubeconfigError

    setup_logging(args.log_level, args.log_format)
    try:
        config = operator_config(args)
    except ValueError as e:
        print(f"keyroute operator: invalid flags: {e}", file=sys.stderr)
        return 2
    # Credentials before kopf starts: a bad kubeconfig is a clear error now, not a login retry loop.
    try:
        creds = Credentials.resolve(args.kubeconfig, args.context)
    except KubeconfigError as e:
        print(f"keyroute operator: {e}", file=sys.stderr)
        return 2
    if "kubernetes" not in sys.modules:
        # kopf imports the kubernetes client whenever it is installed, only to recognise its model
        # objects (keyroute passes none): +17 MB and ~0.5 s for an operator in a pod that never reads
        # a kubeconfig. Marked absent, kopf takes its documented "not installed" path.
        sys.modules["kubernetes"] = None  # type: ignore[assignment]

    import kopf
    from prometheus_client import start_http_server

    import keyroute.controller.login as login

    login.CREDENTIALS[:] = [creds]
    import keyroute.controller.webhook as webhook  # registers the sidecar-injection webhook
    from keyroute.controller.handlers import Operator, operate, register
    from keyroute.controller.metrics import shared as shared_metrics

    # The webhook's startup handler reads its options from the environment (a flag wins over it).
    webhook.export_options(
        port=args.webhook_port,
        cert_dir=args.webhook_cert_dir,
        injection_config=args.injection_config,
        address=args.webhook_address,
    )
    log.info("API server credentials", extra={"kr": {"source": creds.describe, "server": creds.connection().server}})
    # One registry for the reconciler's and the webhook's metrics: the one served on the metrics port.
    operator = Operator(config, shared_metrics())
    registry = kopf.get_default_registry()  # where the webhook module registered itself
    register(operator, registry, start_on_startup=False)
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.metrics_address, registry=operator.metrics.registry)
    if config.election is not None:
        lease = config.election
        log.info(
            "leader election on",
            extra={"kr": {"lease": f"{lease.namespace}/{lease.name}", "identity": lease.identity}},
        )
    running = operate(
        operator,
        registry,
        # kopf's own peering stays off: keyroute elects its leader through a Lease (README).
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace or (),
        liveness_endpoint=(
            f"http://{_url_host(args.health_address)}:{args.health_port}/healthz" if args.health_port else None
        ),
    )
    with contextlib.suppress(asyncio.CancelledError):  # as kopf.run does
        asyncio.run(running)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from keyroute.demo import run_demo

    # The narration is the output; the JSON logs would interleave with it.
    setup_logging("info" if args.verbose else "critical", "json")
    return _run(run_demo(duration=args.duration, rate=args.rate), "auto")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="keyroute", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"keyroute {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def manifests_args(sp: argparse.ArgumentParser, required: bool) -> None:
        sp.add_argument(
            "--manifests", required=required, metavar="PATH", help="YAML file or directory of manifests"
        )
        sp.add_argument("--chain", help="ProviderChain name when the manifests hold several")
        sp.add_argument("--namespace", help="namespace of the chain (default: any)")

    s = sub.add_parser("sidecar", help="run the routing proxy beside an agent")
    s.add_argument("--config", metavar="FILE", help="rendered config (file, or the mounted Secret directory)")
    manifests_args(s, required=False)
    s.add_argument("--listen", default="127.0.0.1:8411", help="proxy address (default 127.0.0.1:8411)")
    s.add_argument("--admin-listen", default="0.0.0.0:8412", help="metrics and health address, or 'off'")
    s.add_argument("--reload-interval", type=float, default=1.0, help="seconds between config checks")
    s.add_argument(
        "--report",
        choices=["auto", "on", "off"],
        default="auto",
        help="report recovery actions as Events (auto: when in a cluster or given --kubeconfig)",
    )
    s.add_argument(
        "--kubeconfig",
        metavar="FILE",
        help="report through this kubeconfig (outside a cluster; any user form kubectl takes, exec plugins too)",
    )
    s.add_argument("--context", help="the kubeconfig context to use (default: its current-context)")
    s.add_argument("--pod-name", help="the reporting pod's name (default: $POD_NAME, else the hostname)")
    s.add_argument("--pod-namespace", help="the pod's namespace (default: $POD_NAMESPACE)")
    s.add_argument(
        "--no-share",
        action="store_true",
        help="do not honour cooldowns other pods reported (pools can opt out with shareCooldowns: false)",
    )
    s.add_argument(
        "--token-metrics",
        choices=["on", "off"],
        default="on",
        help="count the tokens answers report in keyroute_tokens_total (off: fewer series, no usage scan)",
    )
    s.add_argument(
        "--shutdown-grace",
        type=_seconds,
        default=SHUTDOWN_GRACE,
        metavar="SECONDS",
        help="after SIGTERM, how long in-flight requests and streams may still run (default 20: "
        "under Kubernetes' 30 s terminationGracePeriodSeconds); new connections are refused at once",
    )
    s.add_argument("--log-level", default="info")
    s.add_argument("--log-format", choices=["json", "text"], default="json")
    s.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto")
    s.set_defaults(func=_cmd_sidecar)

    o = sub.add_parser(
        "operator", help="run the operator (kopf): reconcile chains and pools into sidecar configs"
    )
    o.add_argument(
        "--namespace", "-n", action="append", help="watch this namespace (repeatable; default: all)"
    )
    o.add_argument(
        "--kubeconfig",
        metavar="FILE",
        help="the API server and credentials (default: $KUBECONFIG, else the pod's ServiceAccount, "
        "else ~/.kube/config)",
    )
    o.add_argument("--context", help="the kubeconfig context to use (default: its current-context)")
    o.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics port (0: off)")
    o.add_argument(
        "--metrics-address", default="0.0.0.0", help="address the metrics server listens on (default 0.0.0.0)"
    )
    o.add_argument("--health-port", type=int, default=8081, help="liveness endpoint port (0: off)")
    o.add_argument(
        "--health-address", default="0.0.0.0", help="address the liveness endpoint listens on (default 0.0.0.0)"
    )
    o.add_argument(
        "--webhook-address",
        metavar="ADDRESS",
        help="address the webhook listens on (default $KEYROUTE_WEBHOOK_ADDRESS, else 0.0.0.0; '::' for IPv6)",
    )
    o.add_argument(
        "--resync-interval",
        type=_seconds,
        metavar="DURATION",
        help="reconcile every pool and chain this often, a net for missed events "
        "(default $KEYROUTE_RESYNC_SECONDS, else 300s)",
    )
    o.add_argument(
        "--retry-delay",
        type=_seconds,
        metavar="DURATION",
        help="wait before a failed reconcile's first retry; it doubles with each further failure of "
        "that object, up to --resync-interval, and starts over once it reconciles (default 5s, at "
        "most the resync interval)",
    )
    # Leader election: controller-runtime's flag names and defaults; the timings as kube-controller-manager's.
    o.add_argument(
        "--leader-elect",
        type=_flag_bool,
        nargs="?",
        const=True,
        default=True,
        metavar="BOOL",
        help="elect a leader through a Lease, so several replicas can run (default true; "
        "--leader-elect=false: this replica always leads)",
    )
    o.add_argument(
        "--leader-election-id", default="keyroute-operator", help="the Lease's name (default keyroute-operator)"
    )
    o.add_argument(
        "--leader-election-namespace",
        metavar="NAMESPACE",
        help="the Lease's namespace (default $POD_NAMESPACE, else the in-cluster ServiceAccount's)",
    )
    o.add_argument(
        "--leader-elect-lease-duration",
        type=_seconds,
        default=15.0,
        metavar="DURATION",
        help="how long a standby waits after the last renewal it saw before taking over (default 15s)",
    )
    o.add_argument(
        "--leader-elect-renew-deadline",
        type=_seconds,
        default=10.0,
        metavar="DURATION",
        help="how long the leader keeps acting without a successful renewal (default 10s)",
    )
    o.add_argument(
        "--leader-elect-retry-period",
        type=_seconds,
        default=2.0,
        metavar="DURATION",
        help="time between tries to acquire or renew the Lease (default 2s)",
    )
    # Defaults live in keyroute.controller.webhook: an unset flag leaves its environment variable be.
    o.add_argument(
        "--webhook-port",
        type=int,
        metavar="PORT",
        help="HTTPS port of the sidecar-injection webhook (default $KEYROUTE_WEBHOOK_PORT, else 0: off)",
    )
    o.add_argument(
        "--webhook-cert-dir",
        metavar="DIR",
        help="directory with the webhook's tls.crt and tls.key "
        "(default $KEYROUTE_WEBHOOK_CERT_DIR, else /etc/keyroute/webhook-tls)",
    )
    o.add_argument(
        "--injection-config",
        metavar="FILE",
        help="sidecar injection settings, YAML or JSON "
        "(default $KEYROUTE_INJECTION_CONFIG, else /etc/keyroute/injection/injection.yaml)",
    )
    o.add_argument("--log-level", default="info")
    o.add_argument("--log-format", choices=["json", "text"], default="json")
    o.set_defaults(func=_cmd_operator)

    d = sub.add_parser("demo", help="watch the sidecar route around failing providers (no cluster, no keys)")
    d.add_argument("--duration", type=float, default=24.0, help="seconds to run (default 24)")
    d.add_argument("--rate", type=float, default=8.0, help="requests per second (default 8)")
    d.add_argument("--verbose", action="store_true", help="also print the sidecar's JSON logs")
    d.set_defaults(func=_cmd_demo)

    c = sub.add_parser("check", help="validate manifests and show what would be routed")
    manifests_args(c, required=True)
    c.set_defaults(func=_cmd_check)

    r = sub.add_parser("render", help="write the sidecar config rendered from manifests")
    manifests_args(r, required=True)
    r.add_argument("--output", "-o", required=True, help="file to write (mode 0600)")
    r.set_defaults(func=_cmd_render)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
