"""A real Kubernetes control plane on 127.0.0.1 for tests and benchmarks (controller-runtime's envtest idea).

etcd, kube-apiserver and kube-controller-manager are the real binaries, found in the folder named by
``KUBEBUILDER_ASSETS`` (controller-runtime's convention; ``setup-envtest use 1.28.x`` gives one, plus a
kube-controller-manager of the same version). Everything the API server does is its own: schema
validation and pruning, CEL, defaulting, the status subresource, resourceVersion and generation,
selectors, RBAC, ServiceAccount tokens, admission webhooks, and with the controller manager garbage
collection, namespace deletion and the ``default`` ServiceAccount of each namespace. There is no
kubelet or scheduler: Pods are validated, mutated and stored, never run.

This module has no pytest in it, so ``bench/`` can start a control plane too::

    with ControlPlane.start(assets) as cp:
        cp.kubectl("get", "namespaces")
        kubeconfig = cp.write_kubeconfig(path, user={"token": cp.create_token("ns", "default")})

Certificates (a CA, the API server's serving certificate, an admin client certificate in
``system:masters``, the ServiceAccount signing key) are made here, with ECDSA P-256 keys: quick to make.
Processes are stopped by their own PIDs; the data directory lives on tmpfs where there is one.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager")
ASSETS_VARIABLE = "KUBEBUILDER_ASSETS"
HOW_TO_GET_ASSETS = (
    "set KUBEBUILDER_ASSETS to a folder holding etcd, kube-apiserver and kube-controller-manager "
    "(v1.28): `setup-envtest use 1.28.x -p path` (controller-runtime's tool) gives the first two, "
    "plus a kube-controller-manager of the same version; `./dev test` finds them by itself where "
    "the project's test kit is unpacked"
)


class ControlPlaneError(RuntimeError):
    """The control plane could not start; the message carries the tail of the failing process's log."""


def find_assets(env: Mapping[str, str] | None = None) -> Path | None:
    """The folder named by ``KUBEBUILDER_ASSETS`` if it holds all three binaries, else ``None``."""
    env = os.environ if env is None else env
    value = env.get(ASSETS_VARIABLE)
    if not value:
        return None
    folder = Path(value)
    if all(os.access(folder / name, os.X_OK) for name in BINARIES):
        return folder
    return None


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the kernel's pick; several suites may share the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- certificates ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and its PEM private key."""

    cert: bytes
    key: bytes = field(repr=False)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def make_ca(cn: str = "keyroute-test-ca") -> tuple[KeyPair, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate (valid a day), and its key for signing."""
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)), key


def issue(
    ca: KeyPair,
    ca_key: ec.EllipticCurvePrivateKey,
    cn: str,
    *,
    org: str | None = None,
    server: bool = False,
    hosts: Sequence[str] = (),
) -> KeyPair:
    """A certificate signed by ``ca``: a client certificate (``CN=user, O=group``), or a serving one."""
    import ipaddress

    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    issuer = x509.load_pem_x509_certificate(ca.cert).subject
    usage = x509.ExtendedKeyUsageOID.SERVER_AUTH if server else x509.ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn, org))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def b64(data: bytes | str) -> str:
    """Base64 of ``data``, as kubeconfigs and webhook ``caBundle`` fields hold it."""
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


# --- processes -------------------------------------------------------------------------------------


@dataclass
class Process:
    """One control-plane binary, its log file, and how to tell it is ready."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        try:
            self.popen = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` (at once if 0); idempotent."""
        popen, self.popen = self.popen, None
        if popen is None or popen.poll() is not None:
            return
        popen.send_signal(signal.SIGTERM if timeout else signal.SIGKILL)
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(5)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class ControlPlane:
    """A running etcd + kube-apiserver + kube-controller-manager; see the module docstring."""

    assets: Path
    workdir: Path
    server: str = ""
    ca: KeyPair | None = None
    admin: KeyPair | None = None
    processes: dict[str, Process] = field(default_factory=dict)
    admin_token: str = field(default="", repr=False)
    _own_workdir: bool = False

    # -- lifecycle

    @classmethod
    def start(cls, assets: Path, workdir: Path | None = None, *, attempts: int = 3) -> ControlPlane:
        """Start all three and wait until the API server is ready (a few seconds); raise
        :class:`ControlPlaneError` with the failing process's log otherwise. Ports are picked free;
        a port taken in the meantime by another suite is retried with new ones."""
        own = workdir is None
        if workdir is None:
            base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
            workdir = Path(tempfile.mkdtemp(prefix="keyroute-envtest-", dir=base))
        cp = cls(assets=assets, workdir=workdir, _own_workdir=own)
        cp._write_certificates()
        error: ControlPlaneError | None = None
        for _ in range(attempts):
            try:
                cp._boot()
                return cp
            except ControlPlaneError as e:
                error = e
                cp._stop_processes()
        cp.close()
        assert error is not None
        raise error

    def _write_certificates(self) -> None:
        ca, ca_key = make_ca()
        self.ca = ca
        serving = issue(ca, ca_key, "kube-apiserver", server=True, hosts=["127.0.0.1", "localhost", "::1"])
        self.admin = issue(ca, ca_key, "keyroute-test-admin", org="system:masters")
        sa_key = _key()
        pki = self.workdir / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        files = {
            "ca.crt": ca.cert,
            "ca.key": ca.key,
            "apiserver.crt": serving.cert,
            "apiserver.key": serving.key,
            "admin.crt": self.admin.cert,
            "admin.key": self.admin.key,
            "sa.key": _pem_key(sa_key),
            "sa.pub": sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        }
        # A static admin token too: a kubeconfig with a bearer token is the simplest a client can use.
        self.admin_token = secrets.token_hex(16)
        files["tokens.csv"] = f'{self.admin_token},keyroute-test-admin-token,1,"system:masters"\n'.encode()
        for name, data in files.items():
            p = pki / name
            p.write_bytes(data)
            p.chmod(0o600)

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    def _boot(self) -> None:
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        data = self.workdir / f"etcd-{etcd_port}"
        self.processes["etcd"] = Process(
            "etcd",
            [
                str(self.assets / "etcd"),
                "--data-dir", str(data),
                "--listen-client-urls", etcd_url,
                "--advertise-client-urls", etcd_url,
                "--listen-peer-urls", peer_url,
                "--initial-advertise-peer-urls", peer_url,
                "--initial-cluster", f"default={peer_url}",
                "--name", "default",
            ],
            self.workdir / "etcd.log",
        )  # fmt: skip
        self.processes["etcd"].start()
        self._wait("etcd", lambda: _http_ok(f"{etcd_url}/health"), 20)

        self.server = f"https://127.0.0.1:{api_port}"
        self.processes["kube-apiserver"] = Process(
            "kube-apiserver", self._apiserver_argv(etcd_url, api_port), self.workdir / "kube-apiserver.log"
        )
        self.start_apiserver()

        kubeconfig = self.write_kubeconfig(self.workdir / "admin.kubeconfig")
        pki = self.pki
        self.processes["kube-controller-manager"] = Process(
            "kube-controller-manager",
            [
                str(self.assets / "kube-controller-manager"),
                "--kubeconfig", str(kubeconfig),
                "--use-service-account-credentials",
                "--service-account-private-key-file", str(pki / "sa.key"),
                "--root-ca-file", str(pki / "ca.crt"),
                "--cluster-signing-cert-file", str(pki / "ca.crt"),
                "--cluster-signing-key-file", str(pki / "ca.key"),
                "--controllers", "*",
                "--leader-elect=false",
                "--bind-address", "127.0.0.1",
                "--secure-port", "0",
                "--feature-gates", "SidecarContainers=true",
            ],
            self.workdir / "kube-controller-manager.log",
        )  # fmt: skip
        self.processes["kube-controller-manager"].start()
        # Ready when the ServiceAccount controller made the default namespace's ServiceAccount.
        self._wait(
            "kube-controller-manager",
            lambda: self._api_ok("/api/v1/namespaces/default/serviceaccounts/default"),
            30,
        )

    def _apiserver_argv(self, etcd_url: str, port: int) -> list[str]:
        pki = self.pki
        return [
            str(self.assets / "kube-apiserver"),
            "--etcd-servers", etcd_url,
            "--bind-address", "127.0.0.1",
            "--secure-port", str(port),
            "--tls-cert-file", str(pki / "apiserver.crt"),
            "--tls-private-key-file", str(pki / "apiserver.key"),
            "--client-ca-file", str(pki / "ca.crt"),
            "--service-account-key-file", str(pki / "sa.pub"),
            "--service-account-signing-key-file", str(pki / "sa.key"),
            "--service-account-issuer", "https://kubernetes.default.svc",
            "--service-cluster-ip-range", "10.96.0.0/16",
            "--authorization-mode", "Node,RBAC",
            "--endpoint-reconciler-type", "none",
            "--feature-gates", "SidecarContainers=true",
            "--allow-privileged=true",
            "--token-auth-file", str(pki / "tokens.csv"),
        ]  # fmt: skip

    def restart_controller_manager(self) -> None:
        """Restart kube-controller-manager, e.g. after installing CRDs: its garbage collector maps
        resources it did not know at start-up only on its next discovery resync (every 30 s), and
        until then leaves the dependents of a deleted custom object in place ("unable to get REST
        mapping"). In a real cluster CRDs are installed long before; this makes it so at once."""
        process = self.processes["kube-controller-manager"]
        process.stop()
        process.start()
        self._wait(
            "kube-controller-manager",
            lambda: self._api_ok("/api/v1/namespaces/default/serviceaccounts/default"),
            30,
        )

    def start_apiserver(self, timeout: float = 60) -> None:
        """(Re)start the API server on its port and wait for ``/readyz``; after a restart, also until
        the controller manager works again (see :meth:`_controllers_working`)."""
        process = self.processes["kube-apiserver"]
        process.start()
        self._wait("kube-apiserver", lambda: self._api_ok("/readyz"), timeout)
        manager = self.processes.get("kube-controller-manager")
        if manager is not None and manager.alive:
            self._controllers_working()

    def _controllers_working(self, timeout: float = 15) -> None:
        """After an API server restart the controller manager's watches reconnect with a backoff, and
        a namespace made meanwhile may wait long for its ``default`` ServiceAccount (seen: > 20 s).
        The control plane is the tests' infrastructure, not what they test: prove the ServiceAccount
        controller answers in a probe namespace, and restart the controller manager if it does not."""
        probe = f"keyroute-probe-{secrets.token_hex(3)}"
        self.request(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": probe}},
        )
        try:
            deadline = time.monotonic() + timeout
            while not self._api_ok(f"/api/v1/namespaces/{probe}/serviceaccounts/default"):
                if time.monotonic() > deadline:
                    self.restart_controller_manager()
                    self.wait_service_account(probe, timeout=30)
                    break
                time.sleep(0.1)
        finally:
            self.request("DELETE", f"/api/v1/namespaces/{probe}")

    def stop_apiserver(self) -> None:
        """Stop the API server only (an outage, done for real); :meth:`start_apiserver` brings it back.

        SIGKILL: a graceful stop drains watches for ~10 s, and a crash is the outage worth testing."""
        self.processes["kube-apiserver"].stop(timeout=0)

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """The API server is down inside the block and up (ready) again after it."""
        self.stop_apiserver()
        try:
            yield
        finally:
            self.start_apiserver()

    def _wait(self, name: str, ready: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        process = self.processes[name]
        while time.monotonic() < deadline:
            if not process.alive:
                raise ControlPlaneError(f"{name} exited at start-up; its log ends:\n{process.log_tail()}")
            if ready():
                return
            time.sleep(0.1)
        raise ControlPlaneError(f"{name} not ready within {timeout}s; its log ends:\n{process.log_tail()}")

    def _stop_processes(self) -> None:
        for name in reversed(BINARIES):  # controller manager, API server, etcd
            process = self.processes.get(name)
            if process is not None:
                process.stop()

    def close(self) -> None:
        """Stop every process (controller manager, API server, etcd, in that order), remove the workdir."""
        self._stop_processes()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- talking to it

    def ssl_context(self, *, admin: bool = True) -> ssl.SSLContext:
        """Trusts the API server's CA; with ``admin``, presents the admin client certificate."""
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        if admin:
            ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def _api_ok(self, url_path: str) -> bool:
        try:
            status, _ = self.request("GET", url_path, timeout=2)
        except (OSError, urllib.error.URLError):
            return False
        return status == 200

    def request(
        self,
        method: str,
        url_path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        timeout: float = 10,
    ) -> tuple[int, Any]:
        """One synchronous admin request: ``(status, decoded body)``; no exception on 4xx/5xx."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + url_path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self.ssl_context(), timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def write_kubeconfig(
        self,
        path: Path,
        *,
        user: Mapping[str, Any] | None = None,
        namespace: str | None = None,
        inline_ca: bool = True,
    ) -> Path:
        """A kubeconfig for this API server. ``user`` is the kubeconfig's user entry (``token``,
        ``tokenFile``, ``client-certificate(-data)``, ``exec``, …); default: the admin certificate inline."""
        if user is None:
            assert self.admin is not None
            user = {"client-certificate-data": b64(self.admin.cert), "client-key-data": b64(self.admin.key)}
        cluster: dict[str, Any] = {"server": self.server}
        assert self.ca is not None
        if inline_ca:
            cluster["certificate-authority-data"] = b64(self.ca.cert)
        else:
            cluster["certificate-authority"] = str(self.pki / "ca.crt")
        context: dict[str, Any] = {"cluster": "envtest", "user": "user"}
        if namespace:
            context["namespace"] = namespace
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "envtest", "cluster": cluster}],
            "users": [{"name": "user", "user": dict(user)}],
            "contexts": [{"name": "envtest", "context": context}],
            "current-context": "envtest",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc))
        path.chmod(0o600)
        return path

    @property
    def admin_kubeconfig(self) -> Path:
        """Admin through a client certificate, inline (what kind, minikube and kubeadm write)."""
        return self.workdir / "admin.kubeconfig"

    @property
    def admin_token_kubeconfig(self) -> Path:
        """Admin through a static bearer token."""
        path = self.workdir / "admin-token.kubeconfig"
        if not path.exists():
            self.write_kubeconfig(path, user={"token": self.admin_token})
        return path

    def kubectl(
        self,
        *args: str,
        kubeconfig: Path | None = None,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
        cwd: Path | str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``kubectl`` against this API server (admin unless ``kubeconfig``); raise on failure when
        ``check``, with kubectl's stderr in the message."""
        env = {**os.environ, "KUBECONFIG": str(kubeconfig or self.admin_kubeconfig)}
        result = subprocess.run(
            ["kubectl", *args],
            input=input,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            cwd=cwd,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def apply(
        self, manifest: str | Mapping[str, Any] | Sequence[Mapping[str, Any]], *, namespace: str | None = None
    ) -> None:
        """``kubectl apply`` YAML text or objects as admin."""
        if not isinstance(manifest, str):
            docs = [manifest] if isinstance(manifest, Mapping) else list(manifest)
            manifest = yaml.safe_dump_all([dict(d) for d in docs])
        args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
        self.kubectl(*args, input=manifest)

    def create_token(self, namespace: str, service_account: str, *, seconds: int = 3600) -> str:
        """A real ServiceAccount token (TokenRequest), so RBAC is what a pod with that account gets."""
        status, body = self.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
             "spec": {"expirationSeconds": seconds}},
        )  # fmt: skip
        if status != 201:
            raise AssertionError(f"TokenRequest for {namespace}/{service_account}: {status} {body}")
        return str(body["status"]["token"])

    def service_account_mount(self, folder: Path, token: str, namespace: str) -> dict[str, str]:
        """What a pod gets to log in with: ``folder`` filled as the kubelet mounts a ServiceAccount
        (``token``, this cluster's ``ca.crt``, ``namespace``), and the service variables it returns."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "token").write_text(token)
        shutil.copy(self.pki / "ca.crt", folder / "ca.crt")
        (folder / "namespace").write_text(namespace)
        host, port = self.server.removeprefix("https://").rsplit(":", 1)
        return {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}

    def wait_service_account(self, namespace: str, name: str = "default", timeout: float = 20) -> None:
        """Wait until the controller manager made ``name`` in ``namespace`` (pods need it to be admitted)."""
        deadline = time.monotonic() + timeout
        while not self._api_ok(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}"):
            if time.monotonic() > deadline:
                raise AssertionError(f"ServiceAccount {namespace}/{name} not made within {timeout}s")
            time.sleep(0.1)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False
