"""How the sidecar (and the operator) log in to the API server: kubeconfig files, the pod's
ServiceAccount, and the client built from either. Credentials never reach an error text or a repr.

No server is contacted: ``Kube._client()`` only builds the session that would carry the headers.
"""

from __future__ import annotations

import base64
import shutil
import ssl
import subprocess
import tempfile
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

import keyroute.kube as kube_mod
from keyroute.kube import Connection, Kube, KubeconfigError, from_kubeconfig, in_cluster

TOKEN = "eyJhbGciOiJSUzI1NiJ9.SECRET-TOKEN-do-not-leak"
PASSWORD = "SECRET-PASSWORD-do-not-leak"
SERVER = "https://api.example.test:6443"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def kubeconfig(
    tmp_path: Path,
    *,
    user: dict[str, Any] | None = None,
    cluster: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
    current: str | None = "main",
    extra: dict[str, Any] | None = None,
) -> Path:
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c1", "cluster": {"server": SERVER, **(cluster or {})}}],
        "users": [{"name": "u1", "user": {"token": TOKEN} if user is None else user}],
        "contexts": [{"name": "main", "context": {"cluster": "c1", "user": "u1", **(context or {})}}],
    }
    if current is not None:
        doc["current-context"] = current
    doc.update(extra or {})
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump(doc))
    return path


# --- from_kubeconfig -------------------------------------------------------------------------------


def test_kubeconfig_with_a_token(tmp_path: Path):
    conn = from_kubeconfig(kubeconfig(tmp_path))
    assert conn.server == SERVER and conn.token == TOKEN
    assert conn.token_file is None and conn.username is None and conn.password is None
    assert conn.insecure is False and conn.namespace is None and conn.scheme == "Bearer"


def test_kubeconfig_token_file_is_relative_to_the_kubeconfig(tmp_path: Path):
    conn = from_kubeconfig(kubeconfig(tmp_path, user={"tokenFile": "tokens/sa"}))
    assert conn.token is None and conn.token_file == str(tmp_path / "tokens" / "sa")


def test_kubeconfig_absolute_paths_are_kept(tmp_path: Path):
    conn = from_kubeconfig(
        kubeconfig(
            tmp_path,
            user={"client-certificate": "/etc/k/tls.crt", "client-key": "/etc/k/tls.key"},
            cluster={"certificate-authority": "/etc/k/ca.crt"},
        )
    )
    assert (conn.certificate_path, conn.private_key_path, conn.ca_path) == (
        "/etc/k/tls.crt",
        "/etc/k/tls.key",
        "/etc/k/ca.crt",
    )


def test_kubeconfig_client_certificate_files(tmp_path: Path):
    conn = from_kubeconfig(
        kubeconfig(
            tmp_path,
            user={"client-certificate": "pki/client.crt", "client-key": "pki/client.key"},
            cluster={"certificate-authority": "pki/ca.crt"},
        )
    )
    assert conn.certificate_path == str(tmp_path / "pki" / "client.crt")
    assert conn.private_key_path == str(tmp_path / "pki" / "client.key")
    assert conn.ca_path == str(tmp_path / "pki" / "ca.crt")
    assert conn.token is None and conn.certificate_data is None


def test_kubeconfig_inline_data_is_base64_decoded(tmp_path: Path):
    conn = from_kubeconfig(
        kubeconfig(
            tmp_path,
            user={"client-certificate-data": b64("CERT PEM"), "client-key-data": b64("KEY PEM")},
            cluster={"certificate-authority-data": b64("CA PEM")},
        )
    )
    assert (conn.certificate_data, conn.private_key_data, conn.ca_data) == ("CERT PEM", "KEY PEM", "CA PEM")
    assert conn.certificate_path is None and conn.ca_path is None


def test_kubeconfig_basic_auth(tmp_path: Path):
    conn = from_kubeconfig(kubeconfig(tmp_path, user={"username": "admin", "password": PASSWORD}))
    assert (conn.username, conn.password, conn.token) == ("admin", PASSWORD, None)


def test_kubeconfig_insecure_skip_tls_verify(tmp_path: Path):
    assert from_kubeconfig(kubeconfig(tmp_path, cluster={"insecure-skip-tls-verify": True})).insecure is True


def test_kubeconfig_namespace_comes_from_the_context(tmp_path: Path):
    assert from_kubeconfig(kubeconfig(tmp_path, context={"namespace": "agents"})).namespace == "agents"


def test_kubeconfig_explicit_context_overrides_the_current_one(tmp_path: Path):
    path = kubeconfig(
        tmp_path,
        extra={
            "clusters": [
                {"name": "c1", "cluster": {"server": SERVER}},
                {"name": "c2", "cluster": {"server": "https://other.test"}},
            ],
            "contexts": [
                {"name": "main", "context": {"cluster": "c1", "user": "u1"}},
                {"name": "staging", "context": {"cluster": "c2", "user": "u1", "namespace": "stg"}},
            ],
        },
    )
    assert from_kubeconfig(path).server == SERVER
    other = from_kubeconfig(path, context="staging")
    assert (other.server, other.namespace, other.token) == ("https://other.test", "stg", TOKEN)


def test_kubeconfig_context_without_user_has_no_credentials(tmp_path: Path):
    conn = from_kubeconfig(kubeconfig(tmp_path, context={"user": None}))
    assert conn.token is None and conn.username is None


def test_kubeconfig_is_accepted_as_str_path(tmp_path: Path):
    assert from_kubeconfig(str(kubeconfig(tmp_path))).token == TOKEN


def assert_no_secret(err: Exception) -> None:
    text = str(err) + repr(err)
    assert TOKEN not in text and "SECRET" not in text and PASSWORD not in text


def test_kubeconfig_missing_file(tmp_path: Path):
    with pytest.raises(KubeconfigError, match="cannot read kubeconfig"):
        from_kubeconfig(tmp_path / "nope")


def test_kubeconfig_unparseable_yaml_names_no_content(tmp_path: Path):
    path = tmp_path / "config"
    path.write_text(f"users: [{{token: {TOKEN}\n  - ]: :")
    with pytest.raises(KubeconfigError, match=r"cannot read kubeconfig .*: ParserError") as info:
        from_kubeconfig(path)
    assert_no_secret(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", ""])
def test_kubeconfig_that_is_not_a_mapping(tmp_path: Path, text: str):
    path = tmp_path / "config"
    path.write_text(text)
    with pytest.raises(KubeconfigError, match="not a mapping"):
        from_kubeconfig(path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"current": "nowhere"}, "no context named 'nowhere'"),
        ({"current": None}, "no context named None"),
        ({"context": {"cluster": "c9"}}, "no cluster named 'c9'"),
        ({"context": {"user": "u9"}}, "no user named 'u9'"),
        ({"cluster": {"server": ""}}, "the cluster has no server"),
        ({"extra": {"clusters": [{"name": "c1", "cluster": {}}]}}, "the cluster has no server"),
        ({"extra": {"clusters": [{"name": "c1"}]}}, "the cluster has no server"),
    ],
)
def test_kubeconfig_errors_name_the_problem_never_the_token(
    tmp_path: Path, kwargs: dict[str, Any], match: str
):
    with pytest.raises(KubeconfigError, match=match) as info:
        from_kubeconfig(
            kubeconfig(tmp_path, user={"token": TOKEN, "username": "u", "password": PASSWORD}, **kwargs)
        )
    assert_no_secret(info.value)


def test_kubeconfig_unknown_explicit_context(tmp_path: Path):
    with pytest.raises(KubeconfigError, match="no context named 'prod'") as info:
        from_kubeconfig(kubeconfig(tmp_path), context="prod")
    assert_no_secret(info.value)


@pytest.mark.parametrize(
    "user",
    [
        {"exec": {"command": "aws", "args": ["eks", "get-token"], "env": [{"name": "T", "value": TOKEN}]}},
        {"auth-provider": {"name": "oidc", "config": {"id-token": TOKEN}}},
        {"token": TOKEN, "exec": {"command": "x"}},
    ],
)
def test_kubeconfig_plugin_users_are_refused(tmp_path: Path, user: dict[str, Any]):
    with pytest.raises(KubeconfigError, match="exec and auth-provider") as info:
        from_kubeconfig(kubeconfig(tmp_path, user=user))
    assert_no_secret(info.value)


def test_connection_repr_hides_credentials():
    conn = Connection(
        server=SERVER,
        token=TOKEN,
        username="admin",
        password=PASSWORD,
        certificate_data="-----BEGIN CERTIFICATE-----SECRET",
        private_key_data="-----BEGIN PRIVATE KEY-----SECRET",
    )
    text = repr(conn) + str(conn)
    assert "SECRET" not in text and TOKEN not in text and PASSWORD not in text
    assert SERVER in text and "admin" in text


def test_connection_repr_of_a_kubeconfig_connection_hides_credentials(tmp_path: Path):
    conn = from_kubeconfig(kubeconfig(tmp_path, user={"token": TOKEN, "username": "u", "password": PASSWORD}))
    assert "SECRET" not in repr(conn)


# --- in_cluster -------------------------------------------------------------------------------------


@pytest.fixture
def sa_dir(tmp_path: Path) -> Path:
    d = tmp_path / "serviceaccount"
    d.mkdir()
    (d / "token").write_text(TOKEN + "\n")
    (d / "ca.crt").write_text("CA")
    (d / "namespace").write_text("agents\n")
    return d


def test_in_cluster_connection(sa_dir: Path):
    conn = in_cluster(
        {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}, sa_dir=sa_dir
    )
    assert conn is not None
    assert conn.server == "https://10.96.0.1:443"
    assert conn.token_file == str(sa_dir / "token") and conn.token is None  # re-read, never kept
    assert conn.ca_path == str(sa_dir / "ca.crt")
    assert conn.namespace == "agents"
    assert TOKEN not in repr(conn)


def test_in_cluster_default_port(sa_dir: Path):
    conn = in_cluster({"KUBERNETES_SERVICE_HOST": "kubernetes.default.svc"}, sa_dir=sa_dir)
    assert conn is not None and conn.server == "https://kubernetes.default.svc:443"


def test_in_cluster_ipv6_host_is_bracketed(sa_dir: Path):
    conn = in_cluster(
        {"KUBERNETES_SERVICE_HOST": "fd00:10:96::1", "KUBERNETES_SERVICE_PORT": "6443"}, sa_dir=sa_dir
    )
    assert conn is not None and conn.server == "https://[fd00:10:96::1]:6443"


def test_in_cluster_without_service_host_is_none(sa_dir: Path):
    assert in_cluster({}, sa_dir=sa_dir) is None
    assert in_cluster({"KUBERNETES_SERVICE_HOST": ""}, sa_dir=sa_dir) is None


def test_in_cluster_without_token_is_none(sa_dir: Path):
    (sa_dir / "token").unlink()
    assert in_cluster({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, sa_dir=sa_dir) is None


def test_in_cluster_without_ca_or_namespace_files(sa_dir: Path):
    (sa_dir / "ca.crt").unlink()
    (sa_dir / "namespace").unlink()
    conn = in_cluster({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, sa_dir=sa_dir)
    assert conn is not None and conn.ca_path is None and conn.namespace is None


def test_in_cluster_reads_os_environ_by_default(sa_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert in_cluster(sa_dir=sa_dir) is None
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "8443")
    conn = in_cluster(sa_dir=sa_dir)
    assert conn is not None and conn.server == "https://10.0.0.1:8443"


# --- Kube.from_connection ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self, start: float = 1000.0):
        self.now = start

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """keyroute.kube's clock, and only keyroute.kube's: the event loop keeps the real one."""
    fake = FakeClock()
    monkeypatch.setattr(kube_mod, "time", types.SimpleNamespace(monotonic=fake.monotonic))
    return fake


def test_token_header():
    kube = Kube.from_connection(Connection(server="http://127.0.0.1:9/", token=TOKEN))
    assert kube.headers["Authorization"] == f"Bearer {TOKEN}"
    assert kube.server == "http://127.0.0.1:9"  # no trailing slash to double up with paths
    assert kube.ssl_context is None and kube.token_file is None
    assert kube.headers["User-Agent"].startswith("keyroute-operator/")


def test_user_agent_is_chosen_by_the_caller():
    kube = Kube.from_connection(Connection(server="http://x", token=TOKEN), user_agent="keyroute-sidecar/1")
    assert kube.headers["User-Agent"] == "keyroute-sidecar/1"


def test_custom_scheme_and_basic_auth():
    kube = Kube.from_connection(Connection(server="http://x", token="t", scheme="Token"))
    assert kube.headers["Authorization"] == "Token t"
    basic = Kube.from_connection(Connection(server="http://x", username="admin", password=PASSWORD))
    assert basic.headers["Authorization"] == "Basic " + b64(f"admin:{PASSWORD}")
    anonymous = Kube.from_connection(Connection(server="http://x"))
    assert "Authorization" not in anonymous.headers


def test_insecure_https_disables_verification():
    kube = Kube.from_connection(Connection(server=SERVER, token=TOKEN, insecure=True))
    assert kube.ssl_context is False


def test_https_verifies_by_default():
    kube = Kube.from_connection(Connection(server=SERVER, token=TOKEN))
    assert isinstance(kube.ssl_context, ssl.SSLContext)
    assert kube.ssl_context.verify_mode is ssl.CERT_REQUIRED and kube.ssl_context.check_hostname


def test_kube_repr_hides_the_authorization_header():
    # BUG: Kube is a dataclass whose repr includes ``headers``, i.e. "Authorization: Bearer <token>"
    # (or Basic user:password). Connection hides its token from repr for this very reason; a Kube
    # in a log line or a traceback's locals would print the credential. Fix: headers with
    # field(repr=False) (or a __repr__ naming only the server).
    kube = Kube.from_connection(Connection(server="http://x", token=TOKEN))
    assert TOKEN not in repr(kube)
    basic = Kube.from_connection(Connection(server="http://x", username="admin", password=PASSWORD))
    assert b64(f"admin:{PASSWORD}") not in repr(basic)


async def test_token_file_is_read_at_first_use_not_at_construction(tmp_path: Path, clock: FakeClock):
    token = tmp_path / "token"
    kube = Kube.from_connection(
        Connection(server="http://127.0.0.1:9", token_file=str(token), token="ignored")
    )
    assert "Authorization" not in kube.headers  # the file wins over a token; nothing read yet
    token.write_text("first-token\n")
    try:
        session = kube._client()
        assert kube.headers["Authorization"] == "Bearer first-token"
        assert session.headers["Authorization"] == "Bearer first-token"
    finally:
        await kube.close()


async def test_rotated_token_is_picked_up_after_a_minute(tmp_path: Path, clock: FakeClock):
    token = tmp_path / "token"
    token.write_text("first-token")
    kube = Kube.from_connection(Connection(server="http://127.0.0.1:9", token_file=str(token)))
    try:
        session = kube._client()
        token.write_text("second-token")
        clock.now += 59.9
        assert kube._client() is session
        assert session.headers["Authorization"] == "Bearer first-token"  # not re-read within 60 s
        clock.now += 0.2
        assert kube._client() is session  # the same session, its header updated in place
        assert kube.headers["Authorization"] == "Bearer second-token"
        assert session.headers["Authorization"] == "Bearer second-token"
    finally:
        await kube.close()


async def test_unreadable_token_file_keeps_the_last_token(tmp_path: Path, clock: FakeClock):
    token = tmp_path / "token"
    token.write_text("first-token")
    kube = Kube.from_connection(Connection(server="http://127.0.0.1:9", token_file=str(token)))
    try:
        kube._client()
        token.unlink()
        clock.now += 120
        kube._client()
        assert kube.headers["Authorization"] == "Bearer first-token"
        token.write_text("third-token")
        kube._client()  # a failed read set no timestamp: the next use tries again
        assert kube.headers["Authorization"] == "Bearer third-token"
    finally:
        await kube.close()


async def test_missing_token_file_at_start_sends_no_authorization(tmp_path: Path, clock: FakeClock):
    kube = Kube.from_connection(Connection(server="http://127.0.0.1:9", token_file=str(tmp_path / "nope")))
    try:
        kube._client()
        assert "Authorization" not in kube.headers
    finally:
        await kube.close()


async def test_close_is_idempotent_and_a_new_session_follows(tmp_path: Path, clock: FakeClock):
    kube = Kube.from_connection(Connection(server="http://127.0.0.1:9", token=TOKEN))
    first = kube._client()
    await kube.close()
    await kube.close()
    assert first.closed
    second = kube._client()
    try:
        assert second is not first and second.headers["Authorization"] == f"Bearer {TOKEN}"
    finally:
        await kube.close()


# --- TLS material -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed certificate and its key (openssl CLI; ``cryptography`` is not installed here)."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        pass
    else:  # pragma: no cover - only where cryptography is installed
        return _pki_with_cryptography(tmp_path_factory.mktemp("pki"))
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("neither the cryptography package nor the openssl CLI is available to make a certificate")
    d = tmp_path_factory.mktemp("pki")
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(d / "tls.key"),
            "-out",
            str(d / "tls.crt"),
            "-days",
            "2",
            "-subj",
            "/CN=keyroute-test-ca",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return {"cert": d / "tls.crt", "key": d / "tls.key"}


def _pki_with_cryptography(d: Path) -> dict[str, Path]:  # pragma: no cover
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keyroute-test-ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (d / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return {"cert": d / "tls.crt", "key": d / "tls.key"}


def ca_subjects(ctx: ssl.SSLContext) -> list[str]:
    return [v for c in ctx.get_ca_certs() for rdn in c["subject"] for k, v in rdn if k == "commonName"]


def test_inline_certificate_data_from_a_kubeconfig(
    tmp_path: Path, pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch
):
    cert, key = pki["cert"].read_text(), pki["key"].read_text()
    conn = from_kubeconfig(
        kubeconfig(
            tmp_path,
            user={"client-certificate-data": b64(cert), "client-key-data": b64(key)},
            cluster={"certificate-authority-data": b64(cert)},
        )
    )
    assert (conn.ca_data, conn.certificate_data, conn.private_key_data) == (cert, cert, key)
    assert "PRIVATE KEY" not in repr(conn)
    made: list[str] = []
    real = tempfile.TemporaryDirectory

    def spy(*args: Any, **kwargs: Any) -> tempfile.TemporaryDirectory[str]:
        made.append((d := real(*args, **kwargs)).name)
        return d

    monkeypatch.setattr(tempfile, "TemporaryDirectory", spy)
    kube = Kube.from_connection(conn)
    assert isinstance(kube.ssl_context, ssl.SSLContext)
    assert "keyroute-test-ca" in ca_subjects(kube.ssl_context)
    # ssl loads client certificates from files only: the key was written, and is gone again.
    assert len(made) == 1 and not Path(made[0]).exists()


def test_base64_ca_data_on_a_connection_is_decoded(pki: dict[str, Path]):
    conn = Connection(server=SERVER, token=TOKEN, ca_data=b64(pki["cert"].read_text()))
    kube = Kube.from_connection(conn)
    assert isinstance(kube.ssl_context, ssl.SSLContext)
    assert "keyroute-test-ca" in ca_subjects(kube.ssl_context)


def test_certificate_files_from_a_kubeconfig(tmp_path: Path, pki: dict[str, Path]):
    conn = from_kubeconfig(
        kubeconfig(
            tmp_path,
            user={"client-certificate": str(pki["cert"]), "client-key": str(pki["key"])},
            cluster={"certificate-authority": str(pki["cert"])},
        )
    )
    kube = Kube.from_connection(conn)
    assert isinstance(kube.ssl_context, ssl.SSLContext)
    assert "keyroute-test-ca" in ca_subjects(kube.ssl_context)
    assert "Authorization" not in kube.headers  # a client certificate is the credential
