"""The ``realapi`` tier: tests on a real kube-apiserver, etcd and kube-controller-manager.

Fixtures:

- ``control_plane`` (session): a :class:`~tests.realapi.controlplane.ControlPlane` started from
  ``KUBEBUILDER_ASSETS``, with keyroute's CRDs applied. Without the binaries every test here skips
  with a message saying how to get them; with ``CI`` set, missing binaries fail the run instead.
- ``namespace``: a fresh namespace per test (its ``default`` ServiceAccount made), deleted afterwards.
- ``api``: :class:`~tests.realapi.client.Api`, admin requests for setting up and looking.
- ``keyroute_process``: :class:`~tests.realapi.processes.Processes`, ``keyroute`` commands run as
  processes of their own; whatever is still running at teardown is killed.
- ``helm`` (session): :class:`~tests.realapi.chart.Helm`, the pinned helm against this API server.
- ``chart_rbac`` (module): the chart's RBAC (cluster-wide values) applied for a release of its own,
  for a module's operator run as the chart's ServiceAccount (:func:`~tests.realapi.chart.run_operator`);
  ``module_processes`` (module): processes that live as long as the module (such an operator).

Every test under this folder is marked ``realapi`` (``pytest -m realapi`` runs just them).
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.realapi.chart import ChartRbac, Helm
from tests.realapi.client import Api
from tests.realapi.controlplane import HOW_TO_GET_ASSETS, ControlPlane, find_assets
from tests.realapi.processes import Processes

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.realapi)
            # The first test of a module also pays for the control plane (session) and the module's
            # operator; on a 2-core machine shared with other suites that can take 30 s on its own.
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(180))


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A real control plane for the whole session, with keyroute's CRDs installed."""
    assets = find_assets()
    if assets is None:
        message = f"no Kubernetes control-plane binaries: {HOW_TO_GET_ASSETS}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set: the realapi tier must run there)")
        pytest.skip(message)
    with ControlPlane.start(assets) as cp:
        cp.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        cp.kubectl("wait", "--for=condition=Established", "--timeout=30s", "-f", str(ROOT / "crds"))
        cp.restart_controller_manager()
        _wait_until_custom_owners_are_collected(cp)
        yield cp


def _wait_until_custom_owners_are_collected(cp: ControlPlane, timeout: float = 40) -> None:
    """Delete a ProviderChain owning a ConfigMap until the garbage collector removes the ConfigMap:
    from then on it maps keyroute's kinds (see :meth:`ControlPlane.restart_controller_manager`)."""
    ns = "keyroute-gc-probe"
    cp.kubectl("create", "namespace", ns)
    chain = {
        "apiVersion": "keyroute.dev/v1alpha1",
        "kind": "ProviderChain",
        "metadata": {"name": "probe", "namespace": ns},
        "spec": {
            "providers": [
                {"provider": "p", "baseURL": "https://p.example/v1", "credentialPoolRef": {"name": "p"}}
            ]
        },
    }
    deadline = time.monotonic() + timeout
    while True:
        cp.apply(chain)
        uid = cp.kubectl("-n", ns, "get", "pchain", "probe", "-o", "jsonpath={.metadata.uid}").stdout
        owner = {"apiVersion": "keyroute.dev/v1alpha1", "kind": "ProviderChain", "name": "probe", "uid": uid}
        cp.apply(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "owned", "namespace": ns, "ownerReferences": [owner]},
            }
        )
        cp.kubectl("-n", ns, "delete", "pchain", "probe")
        round_end = min(deadline, time.monotonic() + 5)
        while time.monotonic() < round_end:
            if cp.kubectl("-n", ns, "get", "configmap", "owned", check=False).returncode != 0:
                cp.kubectl("delete", "namespace", ns, "--wait=false")
                return
            time.sleep(0.2)
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"the garbage collector did not collect a ProviderChain's dependent in {timeout}s"
            )


@pytest.fixture
def namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test, with its default ServiceAccount; deleted afterwards."""
    stem = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"{stem}-{secrets.token_hex(3)}"
    control_plane.kubectl("create", "namespace", name)
    control_plane.wait_service_account(name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
async def api(control_plane: ControlPlane) -> AsyncIterator[Api]:
    async with Api(control_plane.server, control_plane.ssl_context()) as client:
        yield client


@pytest.fixture
def keyroute_process(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.close()


@pytest.fixture(scope="session")
def helm(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(control_plane, tmp_path_factory.mktemp("helm"))


@pytest.fixture(scope="module")
def module_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    procs = Processes(tmp_path_factory.mktemp("processes"))
    try:
        yield procs
    finally:
        procs.close()


@pytest.fixture(scope="module")
def chart_rbac(
    control_plane: ControlPlane, helm: Helm, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ChartRbac]:
    """The chart's cluster-wide RBAC, applied as ``helm template`` renders it (removed afterwards)."""
    with ChartRbac.install(control_plane, helm, tmp_path_factory.mktemp("rbac")) as rbac:
        yield rbac
