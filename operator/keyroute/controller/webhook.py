"""The sidecar-injection mutating webhook (docs/injection.md): the kopf shell around :mod:`keyroute.core.inject`.

kopf serves the handler at :data:`WEBHOOK_PATH` (``/keyroute-inject``): kopf's webhook server routes
``POST /<handler id>`` to the handler with that id, and any other path matches no handler, which
kopf answers with "allowed, no patch". The Helm chart's ``MutatingWebhookConfiguration`` must use
exactly this path (``clientConfig.service.path``), ``objectSelector`` on the ``keyroute.dev/chain``
label (so a broken operator never blocks pods that did not ask for keyroute), operations ``CREATE``
on ``v1/pods``, and ``sideEffects: None`` (the handler only reads).

Configuration comes from environment variables, because ``kopf run`` (and the test harness) imports
this module afresh, which would lose anything set on it beforehand; ``keyroute operator`` turns its
flags into these variables (:func:`export_options`), so a flag wins over the environment:

- ``KEYROUTE_WEBHOOK_PORT`` (``--webhook-port``): ``0`` or unset means no webhook server at all (the
  handler stays registered, harmlessly: nothing can reach it);
- ``KEYROUTE_WEBHOOK_ADDRESS`` (``--webhook-address``): the address to listen on (default ``0.0.0.0``;
  ``::`` for IPv6);
- ``KEYROUTE_WEBHOOK_CERT_DIR`` (``--webhook-cert-dir``): ``tls.crt`` and ``tls.key``, re-read by
  kopf when they change (cert-manager rotation);
- ``KEYROUTE_INJECTION_CONFIG`` (``--injection-config``): the :class:`InjectionSettings` YAML.

A missing or invalid settings file or certificate stops the operator at start-up with a message that
names it: a misconfiguration is found at deployment, not at the first labelled pod. kopf does not
manage the webhook configuration (``settings.admission.managed = None``): the chart owns it, so the
operator needs no RBAC on ``mutatingwebhookconfigurations``.

The handler (on ``CREATE`` of labelled pods only): an invalid label value is refused (400); an
already injected pod is left alone; otherwise the ProviderChain is looked up in the pod's namespace
(the admission request's namespace: the pod's own ``metadata.namespace`` is often empty on create,
and its name too, with ``generateName``), the missing-chain policy applied (:func:`decide`;
rejection: 403 with a message naming the chain and the fix) and the mutation written into kopf's
patch, which kopf sends back as a JSON patch. Warnings (chain missing but injected, lookup failed)
reach the user as admission warnings (``kubectl`` prints them).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf

from keyroute.controller import login as _login
from keyroute.controller.metrics import shared as shared_metrics
from keyroute.core import inject as core
from keyroute.kube import ApiError, Kube
from keyroute.kube import path as api_path

HANDLER_ID = "keyroute-inject"
WEBHOOK_PATH = f"/{HANDLER_ID}"
"""The URL path the webhook is served at; the chart's MutatingWebhookConfiguration must use it."""

ENV_PORT = "KEYROUTE_WEBHOOK_PORT"
ENV_CERT_DIR = "KEYROUTE_WEBHOOK_CERT_DIR"
ENV_ADDRESS = "KEYROUTE_WEBHOOK_ADDRESS"
DEFAULT_ADDRESS = "0.0.0.0"  # a pod's webhook is reached through its Service
ENV_INJECTION_CONFIG = "KEYROUTE_INJECTION_CONFIG"
DEFAULT_CERT_DIR = "/etc/keyroute/webhook-tls"
DEFAULT_INJECTION_CONFIG = "/etc/keyroute/injection/injection.yaml"

GROUP, VERSION = "keyroute.dev", "v1alpha1"

# The loaded injection settings and the API client (kopf's memo is per object; this is per process).
STATE: dict[str, Any] = {}
log = logging.getLogger("keyroute.webhook")


# --- configuration --------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookOptions:
    """Where to listen, the TLS files, and the injection settings file."""

    port: int = 0
    cert_dir: str = DEFAULT_CERT_DIR
    injection_config: str = DEFAULT_INJECTION_CONFIG
    address: str = DEFAULT_ADDRESS

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WebhookOptions:
        """Read the options from the environment (see the module docstring)."""
        env = os.environ if environ is None else environ
        raw_port = env.get(ENV_PORT, "").strip() or "0"
        try:
            port = int(raw_port)
        except ValueError:
            raise ValueError(f"{ENV_PORT}={raw_port!r} is not a port number") from None
        if not 0 <= port <= 65535:
            raise ValueError(f"{ENV_PORT}={port} is not a port number (0 turns the webhook off)")
        return cls(
            port=port,
            address=env.get(ENV_ADDRESS) or DEFAULT_ADDRESS,
            cert_dir=env.get(ENV_CERT_DIR) or DEFAULT_CERT_DIR,
            injection_config=env.get(ENV_INJECTION_CONFIG) or DEFAULT_INJECTION_CONFIG,
        )


def export_options(
    port: int | None = None,
    cert_dir: str | None = None,
    injection_config: str | None = None,
    environ: MutableMapping[str, str] | None = None,
    address: str | None = None,
) -> None:
    """Put the CLI's flags into the environment for :func:`configure`; ``None`` leaves a variable as is."""
    env = os.environ if environ is None else environ
    for name, value in (
        (ENV_PORT, port),
        (ENV_ADDRESS, address),
        (ENV_CERT_DIR, cert_dir),
        (ENV_INJECTION_CONFIG, injection_config),
    ):
        if value is not None:
            env[name] = str(value)


class NamespacedWebhookServer(kopf.WebhookServer):
    """kopf's HTTPS webhook server, plus the request's namespace filled into the object's metadata.

    kopf gives handlers the namespace of the object's own metadata, which the API server leaves
    empty for objects created without one (every pod a ReplicaSet creates); the admission request
    carries it. Filling it in before kopf sees the object changes nothing in the patch: kopf diffs
    against the object as it received it.
    """

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        async def with_namespace(request: Any, **kwargs: Any) -> Any:
            fill_namespace(request)
            return await fn(request, **kwargs)

        async for client_config in super().__call__(with_namespace):
            yield client_config


def fill_namespace(review: Any) -> None:
    """Copy ``request.namespace`` of an AdmissionReview into its objects' metadata where missing."""
    request = review.get("request") if isinstance(review, dict) else None
    if not isinstance(request, dict):
        return
    namespace = request.get("namespace")
    if not isinstance(namespace, str) or not namespace:
        return
    for key in ("object", "oldObject"):
        obj = request.get(key)
        if isinstance(obj, dict):
            meta = obj.setdefault("metadata", {})
            if isinstance(meta, dict) and not meta.get("namespace"):
                meta["namespace"] = namespace


async def _no_webhook_server(fn: Any) -> AsyncIterator[Any]:
    """Serves nothing, forever: kopf refuses to run admission handlers without *some* server."""
    await asyncio.Event().wait()
    yield {}  # never reached; makes this an async generator


def configure_webhook(
    settings: kopf.OperatorSettings,
    port: int,
    cert_dir: str,
    injection_file: str,
    address: str = DEFAULT_ADDRESS,
) -> core.InjectionSettings | None:
    """Set up kopf's webhook server and load the injection settings; ``port`` 0: no server.

    Raises :class:`kopf.PermanentError` (which stops the operator at start-up) when the settings
    file or the TLS files are missing or invalid.
    """
    settings.admission.managed = None  # the Helm chart owns the MutatingWebhookConfiguration
    if not port:
        settings.admission.server = _no_webhook_server
        STATE.pop("injection", None)
        log.info("sidecar injection webhook off", extra={"kr": {"port": 0}})
        return None
    try:
        text = Path(injection_file).read_text()
    except OSError as e:
        raise kopf.PermanentError(f"cannot read the injection settings {injection_file}: {e.strerror}") from e
    try:
        injection = core.load_settings(text)
    except core.SettingsError as e:
        raise kopf.PermanentError(f"{injection_file}: {e}") from None
    certfile, pkeyfile = Path(cert_dir) / "tls.crt", Path(cert_dir) / "tls.key"
    for tls_file in (certfile, pkeyfile):
        if not tls_file.is_file():
            raise kopf.PermanentError(
                f"webhook TLS file {tls_file} not found: mount the webhook certificate Secret there, "
                f"or turn the webhook off with --webhook-port 0"
            )
    settings.admission.server = NamespacedWebhookServer(
        addr=address, port=port, certfile=str(certfile), pkeyfile=str(pkeyfile)
    )
    STATE["injection"] = injection
    log.info(
        "sidecar injection webhook configured",
        extra={
            "kr": {
                "address": address,
                "port": port,
                "path": WEBHOOK_PATH,
                "image": injection.image,
                "mode": str(injection.mode),
                "missingChain": str(injection.missing_chain),
            }
        },
    )
    return injection


class _RefusalFilter(logging.Filter):
    """Drops kopf's ERROR line for a pod this webhook refused on purpose (``AdmissionError``): a
    user's mistake (a missing chain) must not fire log-based alerts. The handler has already logged
    the refusal once, at warning, with the reason; kopf's line for an unexpected exception stays."""

    PREFIX = f"Webhook {HANDLER_ID!r} failed permanently: keyroute: "

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.PREFIX)


def _quiet_refusals() -> None:
    kopf_objects = logging.getLogger("kopf.objects")
    if not any(isinstance(f, _RefusalFilter) for f in kopf_objects.filters):
        kopf_objects.addFilter(_RefusalFilter())


@kopf.on.startup(id="keyroute-webhook-settings")
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Configure the webhook from the environment (see the module docstring)."""
    try:
        options = WebhookOptions.from_env()
    except ValueError as e:
        raise kopf.PermanentError(str(e)) from None
    configure_webhook(settings, options.port, options.cert_dir, options.injection_config, options.address)
    _quiet_refusals()


@kopf.on.cleanup(id="keyroute-webhook-cleanup")
async def cleanup(**_: Any) -> None:
    """Close the API client."""
    entry = STATE.pop("kube", None)
    if entry is not None:
        await entry[1].close()


# --- the handler ----------------------------------------------------------------------------------


def _kube() -> Kube | None:
    """The API client on the operator's credentials (it renews them by itself), once logged in."""
    if not _login.CURRENT:
        return None
    entry = STATE.get("kube")
    if entry is not None and entry[0] is _login.OVERRIDE:
        return entry[1]  # type: ignore[no-any-return]
    kube = _login.kube()
    # Keyed by the override (tests swap it); the old client is left to the garbage collector: a
    # request may still be using it.
    STATE["kube"] = (_login.OVERRIDE, kube)
    return kube


async def chain_exists(
    namespace: str | None, chain: str, within: float = core.LOOKUP_TIMEOUT
) -> tuple[bool | None, str]:
    """Whether the ProviderChain exists: ``(True|False, "")``, or ``(None, why)`` if unknown.

    Any failure to look it up (API down or slow, refused credentials, a client that cannot even be
    built) is "unknown": the README promises such a pod is injected with a warning, never refused
    by an exception. ``why`` names the request and the error's kind, never a credential."""
    if not namespace:
        return None, "the admission request names no namespace"
    url = api_path(GROUP, VERSION, "providerchains", namespace, chain)
    try:
        kube = _kube()
        if kube is None:
            return None, "the operator is not logged in to the API server yet"
        async with asyncio.timeout(within):
            found = await kube.get(url)
    except ApiError as e:
        return None, str(e)
    except TimeoutError:
        return None, f"GET {url}: no answer within {within:g}s"
    except Exception as e:  # an SSL error, a bad certificate, a refused connection, a bug: never a 500
        log.warning(
            "ProviderChain lookup failed", extra={"kr": {"url": url, "error": type(e).__name__}}
        )
        return None, f"GET {url}: {type(e).__name__}"
    return found is not None, ""


@kopf.on.mutate(
    "v1",
    "pods",
    id=HANDLER_ID,
    operations=["CREATE"],
    labels={core.CHAIN_LABEL: kopf.PRESENT},
    side_effects=False,
)
async def inject_sidecar(
    body: kopf.Body,
    patch: kopf.Patch,
    labels: Mapping[str, str],
    namespace: str | None,
    warnings: list[str],
    dryrun: bool,
    **kwargs: Any,
) -> None:
    """Add the keyroute sidecar to a labelled pod being created (see the module docstring)."""
    # kopf does not filter by operation itself (the operations only go into a kopf-managed webhook
    # configuration): an UPDATE sent by a misconfigured webhook must not try to add containers.
    if kwargs.get("operation") != "CREATE":
        return
    admissions = shared_metrics().admissions
    injection: core.InjectionSettings | None = STATE.get("injection")
    if injection is None:  # only reachable through a server this module did not configure
        admissions.labels("refused", "NotConfigured").inc()
        raise kopf.AdmissionError("keyroute: the sidecar injection webhook is not configured", code=500)
    pod: dict[str, Any] = dict(body)
    if core.is_injected(pod):
        admissions.labels("skipped", "AlreadyInjected").inc()
        return
    chain = labels.get(core.CHAIN_LABEL, "")
    meta = pod.get("metadata") or {}
    where = {
        "namespace": namespace,
        "pod": meta.get("name") or f"{meta.get('generateName') or ''}<generated>",
        "chain": chain,
        "dryRun": dryrun,
    }
    try:
        core.check_chain_name(chain)
    except core.InjectionError as e:
        log.warning("pod refused: invalid chain label", extra={"kr": {**where, "reason": str(e)}})
        admissions.labels("refused", "InvalidChainLabel").inc()
        raise kopf.AdmissionError(f"keyroute: {e}", code=400) from None

    exists, why = await chain_exists(namespace, chain, injection.lookup_timeout)
    decision = core.decide(chain, namespace or "?", exists, injection.missing_chain, lookup_error=why)
    if not decision.inject:
        log.warning("pod refused: chain not found", extra={"kr": {**where, "reason": decision.message}})
        admissions.labels("refused", "ChainNotFound").inc()
        raise kopf.AdmissionError(f"keyroute: {decision.message}", code=403)
    if decision.message:
        warnings.append(decision.message)
        log.warning("injecting without a known chain", extra={"kr": {**where, "reason": decision.message}})

    try:
        mutation = core.inject(pod, chain, injection)
    except core.InjectionError as e:
        log.warning("pod refused: cannot inject", extra={"kr": {**where, "reason": str(e)}})
        admissions.labels("refused", "CannotInject").inc()
        raise kopf.AdmissionError(f"keyroute: {e}", code=400) from None
    # Whole lists: kopf turns this merge-style patch into a JSON patch against the object it received.
    for key, value in mutation.spec.items():
        patch.spec[key] = value
    for key, annotation in mutation.annotations.items():
        patch.metadata.annotations[key] = annotation
    log.info("sidecar injected", extra={"kr": {**where, "mode": str(injection.mode)}})
    admissions.labels("injected", "InjectedWithWarning" if decision.message else "Injected").inc()
