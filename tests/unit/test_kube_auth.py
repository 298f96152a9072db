"""How the sidecar and the operator log in to the API server: kubeconfig files (loaded by the official
kubernetes client), the pod's ServiceAccount, the renewal of expiring or refused credentials, and the
client built from them. Credentials never reach an error text, a log line or a repr.

Kubeconfigs are real files, exec plugins real scripts, and the 401 retry goes to a real HTTP server
on loopback; time is a parameter (:class:`Credentials` takes its clocks).
"""

from __future__ import annotations

import base64
import datetime
import logging
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from keyroute.kube import (
    ApiError,
    Connection,
    Credentials,
    Kube,
    KubeconfigError,
    from_kubeconfig,
    in_cluster,
)

TOKEN = "eyJhbGciOiJSUzI1NiJ9.SECRET-TOKEN-do-not-leak"
PASSWORD = "SECRET-PASSWORD-do-not-leak"
SERVER = "https://api.example.test:6443"
UTC = datetime.UTC


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


def assert_no_secret(text: str) -> None:
    assert TOKEN not in text and "SECRET" not in text and PASSWORD not in text


def exec_plugin(tmp_path: Path, body: str, name: str = "plugin") -> Path:
    """An exec credential plugin: a Python script (as aws/gke-gcloud-auth-plugin/kubelogin are programs)."""
    script = tmp_path / name
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    script.chmod(0o755)
    return script


def exec_user(script: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": str(script),
            "args": ["get-token", "--cluster", "c1"],
            "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
            "interactiveMode": "Never",
        }
    }


PRINT_TOKEN = """
    import datetime, json, os, sys
    expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=int(os.environ.get("LIFETIME", "900")))
    print(json.dumps({
        "apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
        "status": {"token": os.environ["PLUGIN_TOKEN"], "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ")},
    }))
"""


# --- from_kubeconfig (the kubernetes client's loader) ---------------------------------------------


def test_kubeconfig_with_a_token(tmp_path: Path):
    conn = from_kubeconfig(kubeconfig(tmp_path))
    assert conn.server == SERVER and conn.token == TOKEN and conn.scheme == "Bearer"
    assert conn.username is None and conn.password is None and conn.expiration is None
    assert conn.insecure is False and conn.namespace is None
    assert conn.authorization() == f"Bearer {TOKEN}"


def test_kubeconfig_token_file_is_relative_to_the_kubeconfig(tmp_path: Path):
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "sa").write_text("file-token\n")
    conn = from_kubeconfig(kubeconfig(tmp_path, user={"tokenFile": "tokens/sa"}))
    assert conn.token == "file-token"


def test_kubeconfig_client_certificate_files_stay_files(tmp_path: Path, pki: dict[str, Path]):
    conn = from_kubeconfig(
        kubeconfig(
            tmp_path,
            user={"client-certificate": str(pki["cert"]), "client-key": str(pki["key"])},
            cluster={"certificate-authority": str(pki["cert"])},
        )
    )
    assert conn.certificate_path == str(pki["cert"]) and conn.private_key_path == str(pki["key"])
    assert conn.ca_path == str(pki["cert"])
    assert conn.token is None and conn.certificate_data is None and conn.authorization() is None


def test_kubeconfig_missing_certificate_file_is_named(tmp_path: Path):
    with pytest.raises(KubeconfigError, match=r"File does not exist: .*nope\.crt"):
        from_kubeconfig(kubeconfig(tmp_path, user={"client-certificate": "nope.crt", "client-key": "nope.key"}))


def test_kubeconfig_inline_data_is_read_back_and_no_file_is_left(
    tmp_path: Path, pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch
):
    """What kind, minikube and kubeadm write (issue 9, bug 1: kopf passed these on base64-encoded)."""
    cert, key = pki["cert"].read_text(), pki["key"].read_text()
    made: list[str] = []
    real = tempfile.TemporaryDirectory

    def spy(*args: Any, **kwargs: Any) -> tempfile.TemporaryDirectory[str]:
        made.append((d := real(*args, **kwargs)).name)
        return d

    monkeypatch.setattr(tempfile, "TemporaryDirectory", spy)
    conn = from_kubeconfig(
        kubeconfig(
            tmp_path,
            user={"client-certificate-data": b64(cert), "client-key-data": b64(key)},
            cluster={"certificate-authority-data": b64(cert)},
        )
    )
    assert (conn.ca_data, conn.certificate_data, conn.private_key_data) == (cert, cert, key)
    assert conn.certificate_path is None and conn.ca_path is None
    assert "PRIVATE KEY" not in repr(conn)
    # The kubernetes client writes inline data to files: ours were in a private folder, now gone.
    assert made and not any(Path(d).exists() for d in made)
    ctx = Connection(server=SERVER, ca_data=cert, certificate_data=cert, private_key_data=key).ssl_context()
    assert isinstance(ctx, ssl.SSLContext) and "keyroute-test-ca" in ca_subjects(ctx)


def test_kubeconfig_basic_auth(tmp_path: Path):
    conn = from_kubeconfig(kubeconfig(tmp_path, user={"username": "admin", "password": PASSWORD}))
    assert conn.authorization() == "Basic " + b64(f"admin:{PASSWORD}")
    assert_no_secret(repr(conn))


def test_kubeconfig_insecure_skip_tls_verify(tmp_path: Path):
    conn = from_kubeconfig(kubeconfig(tmp_path, cluster={"insecure-skip-tls-verify": True}))
    assert conn.insecure is True and conn.ssl_context() is False


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


def test_kubeconfig_list_of_files_like_KUBECONFIG(tmp_path: Path):
    (tmp_path / "a").mkdir()
    first = kubeconfig(tmp_path / "a", current="main")
    second = tmp_path / "second"
    second.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "users": [], "clusters": []}))
    assert from_kubeconfig(f"{first}{os.pathsep}{second}").token == TOKEN
    # As with kubectl, a missing file in a list is skipped; only a list with none is an error.
    assert from_kubeconfig(f"{tmp_path / 'gone'}{os.pathsep}{first}").token == TOKEN
    with pytest.raises(KubeconfigError, match=r"no such file: .*gone"):
        from_kubeconfig(f"{tmp_path / 'gone'}{os.pathsep}{tmp_path / 'gone-too'}")


def test_kubeconfig_context_without_user_has_no_credentials(tmp_path: Path):
    conn = from_kubeconfig(kubeconfig(tmp_path, context={"user": None}))
    assert conn.authorization() is None


def test_kubeconfig_missing_file(tmp_path: Path):
    with pytest.raises(KubeconfigError, match=r"kubeconfig .*nope: no such file"):
        from_kubeconfig(tmp_path / "nope")


def test_kubeconfig_unparseable_yaml_names_no_content(tmp_path: Path):
    path = tmp_path / "config"
    path.write_text(f"users: [{{token: {TOKEN}\n  - ]: :")
    with pytest.raises(KubeconfigError, match=r"cannot read kubeconfig .*: ParserError") as info:
        from_kubeconfig(path)
    assert_no_secret(str(info.value))


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", ""])
def test_kubeconfig_that_is_not_a_mapping(tmp_path: Path, text: str):
    path = tmp_path / "config"
    path.write_text(text)
    with pytest.raises(KubeconfigError, match=r"kubeconfig .*config"):
        from_kubeconfig(path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"current": "nowhere"}, r"no context named 'nowhere' \(the current-context\)"),
        ({"current": None}, "no current-context"),
        ({"context": {"cluster": "c9"}}, "no cluster named 'c9'"),
        ({"cluster": {"server": ""}}, "cluster 'c1' has no server"),
        ({"extra": {"clusters": [{"name": "c1", "cluster": {}}]}}, "cluster 'c1' has no server"),
    ],
)
def test_kubeconfig_errors_name_the_problem_never_the_token(tmp_path: Path, kwargs: dict[str, Any], match: str):
    with pytest.raises(KubeconfigError, match=match) as info:
        from_kubeconfig(kubeconfig(tmp_path, user={"token": TOKEN, "username": "u", "password": PASSWORD}, **kwargs))
    assert_no_secret(str(info.value) + repr(info.value))


def test_kubeconfig_unknown_explicit_context(tmp_path: Path):
    with pytest.raises(KubeconfigError, match="no context named 'prod'") as info:
        from_kubeconfig(kubeconfig(tmp_path), context="prod")
    assert_no_secret(str(info.value))


def test_exec_plugin_token_and_expiration(tmp_path: Path):
    script = exec_plugin(tmp_path, PRINT_TOKEN)
    conn = from_kubeconfig(kubeconfig(tmp_path, user=exec_user(script, {"PLUGIN_TOKEN": TOKEN, "LIFETIME": "600"})))
    assert conn.authorization() == f"Bearer {TOKEN}"
    assert conn.expiration is not None
    left = (conn.expiration - datetime.datetime.now(UTC)).total_seconds()
    assert 500 < left <= 600
    assert_no_secret(repr(conn))


def test_exec_plugin_that_fails_names_the_command_not_its_secrets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    script = exec_plugin(
        tmp_path, """
        import sys
        print("error: SSO session expired; run aws sso login", file=sys.stderr)
        sys.exit(3)
        """, name="aws")
    path = kubeconfig(tmp_path, user=exec_user(script, {"AWS_SECRET_ACCESS_KEY": PASSWORD}))
    with caplog.at_level(logging.DEBUG), pytest.raises(KubeconfigError) as info:
        from_kubeconfig(path)
    text = str(info.value)
    assert "exec credential plugin 'aws' failed" in text and "process returned 3" in text
    assert "SSO session expired" in text  # the plugin's own word on what to do
    assert_no_secret(text + caplog.text)
    assert "failed" not in caplog.text  # captured into the error, not logged by the client as well


def test_exec_plugin_command_not_found(tmp_path: Path):
    with pytest.raises(KubeconfigError, match=r"exec credential plugin 'no-such-plugin' failed: .*No such file"):
        from_kubeconfig(kubeconfig(tmp_path, user=exec_user(tmp_path / "no-such-plugin")))


def test_exec_plugin_printing_garbage(tmp_path: Path):
    script = exec_plugin(tmp_path, f"print('{TOKEN}')\n")
    with pytest.raises(KubeconfigError, match="failed: exec: failed to decode process output") as info:
        from_kubeconfig(kubeconfig(tmp_path, user=exec_user(script)))
    # json's message quotes no input; the token the plugin printed is not in the error.
    assert_no_secret(str(info.value))


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
    assert_no_secret(text)
    assert SERVER in text and "admin" in text


def test_kubeconfig_is_not_imported_for_a_pod(tmp_path: Path):
    """The sidecar in a pod must not pay for the kubernetes client (its idle RSS has a goal)."""
    (tmp_path / "token").write_text("t")
    code = textwrap.dedent(f"""
        import sys
        import keyroute.cli, keyroute.kube, keyroute.sidecar.app, keyroute.sidecar.reporter
        from pathlib import Path
        creds = keyroute.kube.Credentials.token_file(
            keyroute.kube.in_cluster({{"KUBERNETES_SERVICE_HOST": "10.0.0.1"}}, sa_dir=Path({str(tmp_path)!r})))
        keyroute.kube.Kube(creds)
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("kubernetes", "kopf")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout


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


# --- Credentials: renewal ---------------------------------------------------------------------------


class Clocks:
    """Both clocks :class:`Credentials` reads: monotonic seconds and the wall clock."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = datetime.datetime(2026, 12, 6, 8, 0, tzinfo=UTC)

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += datetime.timedelta(seconds=seconds)

    def kwargs(self) -> dict[str, Any]:
        return {"clock": lambda: self.mono, "now": lambda: self.wall}


def test_token_file_is_reread_after_a_minute(tmp_path: Path):
    clocks = Clocks()
    token = tmp_path / "token"
    token.write_text("first-token\n")
    creds = Credentials.token_file(Connection(server="http://x", token_file=str(token)), **clocks.kwargs())
    assert creds.connection().authorization() == "Bearer first-token"
    token.write_text("second-token")
    clocks.advance(59.9)
    assert not creds.due() and creds.connection().token == "first-token"
    clocks.advance(0.2)
    assert creds.due() and creds.connection().token == "second-token"


def test_token_file_is_reread_when_refused(tmp_path: Path):
    clocks = Clocks()
    token = tmp_path / "token"
    token.write_text("first-token")
    creds = Credentials.token_file(Connection(server="http://x", token_file=str(token)), **clocks.kwargs())
    first = creds.connection()
    token.write_text("rotated")
    assert creds.connection(renew=True) is first  # refusals renew at most every 2 s
    clocks.advance(2)
    assert creds.connection(renew=True).token == "rotated"


def test_unreadable_token_file_keeps_the_last_token(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    clocks = Clocks()
    token = tmp_path / "token"
    token.write_text(TOKEN)
    creds = Credentials.token_file(Connection(server="http://x", token_file=str(token)), **clocks.kwargs())
    creds.connection()
    token.unlink()
    clocks.advance(120)
    assert creds.connection().token == TOKEN
    assert "cannot read the ServiceAccount token" in caplog.text and TOKEN not in caplog.text
    token.write_text("third-token")
    clocks.advance(60)
    assert creds.connection().token == "third-token"


def test_missing_token_file_at_start_sends_no_authorization(tmp_path: Path):
    creds = Credentials.token_file(Connection(server="http://x", token_file=str(tmp_path / "nope")))
    assert creds.connection().authorization() is None


def test_an_expiring_token_is_renewed_ahead_of_its_expiration():
    clocks = Clocks()
    tokens = iter(["t1", "t2", "t3"])

    def load() -> Connection:
        return Connection(server="http://x", token=next(tokens), expiration=clocks.wall + datetime.timedelta(minutes=15))

    creds = Credentials(load, describe="test", **clocks.kwargs())
    assert creds.connection().token == "t1"
    assert creds.renew_after == clocks.wall + datetime.timedelta(minutes=14)  # a minute ahead at most
    clocks.advance(13 * 60 + 59)
    assert not creds.due() and creds.connection().token == "t1"
    clocks.advance(1)
    assert creds.due() and creds.connection().token == "t2"
    assert creds.renewals == 1


def test_a_short_lived_token_is_renewed_at_four_fifths_of_its_life():
    clocks = Clocks()
    creds = Credentials(
        lambda: Connection(server="http://x", token="t", expiration=clocks.wall + datetime.timedelta(seconds=10)),
        describe="test",
        **clocks.kwargs(),
    )
    creds.connection()
    clocks.advance(7.9)
    assert not creds.due()
    clocks.advance(0.1)
    assert creds.due()


def test_a_failed_renewal_keeps_the_current_credentials_and_retries_later(caplog: pytest.LogCaptureFixture):
    clocks = Clocks()
    attempts: list[int] = []

    def load() -> Connection:
        attempts.append(1)
        if len(attempts) == 2:
            raise KubeconfigError("kubeconfig k: the exec credential plugin 'aws' failed: exit 1")
        return Connection(server="http://x", token=f"t{len(attempts)}", expiration=clocks.wall + datetime.timedelta(seconds=60))

    creds = Credentials(load, describe="kubeconfig k", **clocks.kwargs())
    creds.connection()
    clocks.advance(60)  # expired: renewal fails, the last token is kept (the server will say if it is bad)
    assert creds.connection().token == "t1"
    record = next(r for r in caplog.records if r.getMessage().startswith("cannot renew the Kubernetes credentials"))
    assert "'aws' failed" in record.kr["error"] and record.kr["source"] == "kubeconfig k"
    clocks.advance(9)
    assert not creds.due()
    clocks.advance(1)
    assert creds.connection().token == "t3"


def test_a_bad_kubeconfig_fails_at_start(tmp_path: Path):
    with pytest.raises(KubeconfigError, match="no such file"):
        Credentials.kubeconfig(tmp_path / "missing")


def test_resolve_order_flag_env_pod_home(tmp_path: Path, sa_dir: Path):
    flag = kubeconfig(tmp_path)
    pod = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    home = str(tmp_path / "home-config")
    assert Credentials.resolve(flag, env=pod, sa_dir=sa_dir).describe == f"kubeconfig {flag}"
    assert Credentials.resolve(env={**pod, "KUBECONFIG": str(flag)}, sa_dir=sa_dir).describe == f"kubeconfig {flag}"
    assert Credentials.resolve(env=pod, sa_dir=sa_dir, home_config=home).describe.startswith("token file")
    with pytest.raises(KubeconfigError, match="no credentials: not in a pod") as info:
        Credentials.resolve(env={}, sa_dir=sa_dir, home_config=home)
    assert "home-config" in str(info.value)
    shutil.copy(flag, home)
    assert Credentials.resolve(env={}, sa_dir=sa_dir, home_config=home).describe == f"kubeconfig {home}"
    with pytest.raises(KubeconfigError, match="--context needs a kubeconfig"):
        Credentials.resolve(None, "prod", env=pod, sa_dir=sa_dir)


# --- Kube -------------------------------------------------------------------------------------------


def test_token_header():
    kube = Kube.from_connection(Connection(server="http://127.0.0.1:9/", token=TOKEN))
    assert kube.headers["Authorization"] == f"Bearer {TOKEN}"
    assert kube.server == "http://127.0.0.1:9"  # no trailing slash to double up with paths
    assert kube.ssl_context is None
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
    assert Kube.from_connection(Connection(server=SERVER, token=TOKEN, insecure=True)).ssl_context is False


def test_https_verifies_by_default():
    kube = Kube.from_connection(Connection(server=SERVER, token=TOKEN))
    assert isinstance(kube.ssl_context, ssl.SSLContext)
    assert kube.ssl_context.verify_mode is ssl.CERT_REQUIRED and kube.ssl_context.check_hostname


def test_kube_repr_hides_the_authorization_header():
    kube = Kube.from_connection(Connection(server="http://x", token=TOKEN))
    assert TOKEN not in repr(kube)
    basic = Kube.from_connection(Connection(server="http://x", username="admin", password=PASSWORD))
    assert b64(f"admin:{PASSWORD}") not in repr(basic)


class KopfLikeInfo:
    """What kopf's login_with_kubeconfig made of a kind kubeconfig: the ``*_data`` fields base64."""

    def __init__(self, cert: str, key: str) -> None:
        self.server = SERVER
        self.ca_path = None
        self.ca_data = b64(cert)
        self.insecure = None
        self.username = self.password = self.scheme = self.token = None
        self.certificate_path = self.private_key_path = None
        self.certificate_data = b64(cert)
        self.private_key_data = b64(key)
        self.default_namespace = None


def test_base64_certificate_data_from_kopf_is_decoded(pki: dict[str, Path]):
    """Issue 9, bug 1: ``ssl.SSLError: PEM lib`` on the base64 fields kopf passes on."""
    kube = Kube.from_connection(KopfLikeInfo(pki["cert"].read_text(), pki["key"].read_text()))
    assert isinstance(kube.ssl_context, ssl.SSLContext)
    assert "keyroute-test-ca" in ca_subjects(kube.ssl_context)


def test_certificate_data_that_is_not_pem_is_a_clear_error():
    with pytest.raises(KubeconfigError, match="neither PEM nor base64") as info:
        Kube.from_connection(Connection(server=SERVER, certificate_data="\x00SECRET", private_key_data="\x00SECRET"))
    assert_no_secret(str(info.value))


def test_certificate_files_from_a_kubeconfig(tmp_path: Path, pki: dict[str, Path]):
    conn = from_kubeconfig(
        kubeconfig(
            tmp_path,
            user={"client-certificate": str(pki["cert"]), "client-key": str(pki["key"])},
            cluster={"certificate-authority": str(pki["cert"])},
        )
    )
    kube = Kube(Credentials.of(conn))
    assert isinstance(kube.ssl_context, ssl.SSLContext)
    assert "keyroute-test-ca" in ca_subjects(kube.ssl_context)
    assert "Authorization" not in kube.headers  # a client certificate is the credential


@pytest.fixture
async def api_server() -> AsyncIterator[tuple[str, list[str | None], set[str]]]:
    """A loopback HTTP server that accepts only the tokens in ``valid`` and records what it was sent."""
    seen: list[str | None] = []
    valid: set[str] = set()

    async def handle(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization")
        seen.append(auth)
        if auth is None or auth.removeprefix("Bearer ") not in valid:
            return web.json_response({"kind": "Status", "reason": "Unauthorized"}, status=401)
        return web.json_response({"kind": "Namespace", "metadata": {"name": "default"}})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", seen, valid
    finally:
        await runner.cleanup()


async def test_a_refused_token_is_renewed_and_the_request_sent_again(api_server, tmp_path: Path):
    server, seen, valid = api_server
    token = tmp_path / "token"
    token.write_text("old")
    clocks = Clocks()
    kube = Kube(Credentials.token_file(Connection(server=server, token_file=str(token)), **clocks.kwargs()))
    try:
        valid.add("old")
        assert await kube.get("/api/v1/namespaces/default")
        token.write_text("new")  # rotated, and the old one revoked, within the minute
        valid.clear()
        valid.add("new")
        clocks.advance(5)
        assert await kube.create("/api/v1/namespaces/default/events", {"kind": "Event"})
        assert seen == ["Bearer old", "Bearer old", "Bearer new"]
    finally:
        await kube.close()


async def test_a_refusal_that_renewal_cannot_cure_is_an_api_error(api_server):
    server, seen, valid = api_server
    kube = Kube.from_connection(Connection(server=server, token=TOKEN))
    try:
        with pytest.raises(ApiError) as info:
            await kube.get("/api/v1/namespaces/default")
        assert info.value.status == 401 and len(seen) == 1  # fixed credentials: not sent again
        assert_no_secret(str(info.value))
    finally:
        await kube.close()


async def test_close_is_idempotent_and_a_new_session_follows(api_server):
    server, seen, valid = api_server
    valid.add(TOKEN)
    kube = Kube.from_connection(Connection(server=server, token=TOKEN))
    assert await kube.get("/x")
    await kube.close()
    await kube.close()
    try:
        assert await kube.get("/x")
    finally:
        await kube.close()


def test_kube_reports_an_exec_plugins_token(tmp_path: Path):
    script = exec_plugin(tmp_path, PRINT_TOKEN)
    path = kubeconfig(tmp_path, user=exec_user(script, {"PLUGIN_TOKEN": "plugin-token"}))
    kube = Kube(Credentials.kubeconfig(path))
    assert kube.headers["Authorization"] == "Bearer plugin-token"
    assert "plugin-token" not in repr(kube) and str(path) in repr(kube)


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


# --- what kopf logs in with (the operator) -------------------------------------------------------------


def test_kopf_gets_pem_data_and_the_renewal_time(pki: dict[str, Path]):
    from keyroute.controller.login import connection_info

    cert, key = pki["cert"].read_text(), pki["key"].read_text()
    soon = datetime.datetime.now(UTC) + datetime.timedelta(minutes=10)
    info = connection_info(
        Connection(server=SERVER, ca_data=b64(cert), certificate_data=b64(cert), private_key_data=b64(key), namespace="ns"),
        soon,
    )
    assert (info.ca_data, info.certificate_data, info.private_key_data) == (cert, cert, key)
    assert info.expiration == soon and info.default_namespace == "ns" and info.token is None
    assert "keyroute-test-ca" in ca_subjects(info.as_ssl_context())  # kopf's own use of it
    token = connection_info(Connection(server=SERVER, token=TOKEN))
    assert token.as_http_headers() == {"Authorization": f"Bearer {TOKEN}"} and token.expiration is None


def test_kopf_is_never_told_a_token_expired_already():
    """A plugin handing out expired tokens must not make kopf log in again in a tight loop."""
    from keyroute.controller.login import connection_info

    past = datetime.datetime.now(UTC) - datetime.timedelta(minutes=1)
    info = connection_info(Connection(server=SERVER, token=TOKEN, expiration=past))
    assert info.expiration is not None and info.expiration > datetime.datetime.now(UTC)
