"""The container image: its dependency lock, its Dockerfile, and its install steps run for real.

There is no container engine here, so the Dockerfile cannot be built. What makes it trustworthy
instead: every install command lives in ``docker/install.sh``, which the Dockerfile RUNs and
:func:`test_image_install_script_builds_a_working_keyroute` runs into a temporary directory (the
one slow test of this file, ~25 s: it builds the wheel and installs the lock from PyPI). Not checked:
the base image itself (``python:3.11-slim``), the layer order and the final stage's COPY.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "image.txt"
DOCKERFILE = ROOT / "Dockerfile"
INSTALL = ROOT / "docker" / "install.sh"


def pins(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
        assert m, f"{path.name}: not an exact pin: {line!r}"
        name = canonicalize_name(m.group(1))
        assert name not in out, f"{path.name}: {name} pinned twice"
        out[name] = m.group(2)
    return out


def project() -> dict[str, object]:
    data: dict[str, object] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return data


def runtime_closure() -> set[str]:
    """pyproject's dependencies plus the `fast` extra, and everything they need on this platform.

    Read from the installed distributions' metadata (the dev venv holds exactly constraints.txt);
    the image runs the same Python minor version on Linux, so the markers evaluate alike.
    """
    extras, deps = project()["optional-dependencies"], project()["dependencies"]
    assert isinstance(extras, dict) and isinstance(deps, list)
    todo = [Requirement(r) for r in [*deps, *extras["fast"]]]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            pytest.fail(f"{req.name} is not installed in the dev venv: run ./dev test to install it")
        todo += [Requirement(r) for r in dist.requires or []]
    return seen


def test_lock_pins_exactly_the_constraints_versions() -> None:
    lock = pins(LOCK)
    constraints = pins(ROOT / "constraints.txt")
    assert lock, "requirements/image.txt is empty"
    for name, version in lock.items():
        assert name in constraints, f"{name} is in the image lock but not in constraints.txt"
        assert constraints[name] == version, f"{name}: image {version}, constraints.txt {constraints[name]}"


def test_lock_is_the_runtime_closure_and_no_test_tool() -> None:
    lock = set(pins(LOCK))
    closure = runtime_closure()
    assert lock - closure == set(), "not needed at run time: remove from requirements/image.txt"
    assert closure - lock == set(), (
        "needed at run time: add to requirements/image.txt (version from constraints.txt)"
    )
    extras = project()["optional-dependencies"]
    assert isinstance(extras, dict)
    test_tools: set[str] = {canonicalize_name(Requirement(r).name) for r in extras["test"]}
    test_tools |= {"pytest", "mypy", "ruff", "kmock", "iniconfig", "pluggy", "pygments", "grimp"}
    assert lock & test_tools == set()


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_shape() -> None:
    ins = dockerfile_instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS builder", "${PYTHON_IMAGE}"]  # one base for both stages
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim") in ins
    final = ins[max(i for i, (word, _) in enumerate(ins) if word == "FROM") :]
    runs = [rest for word, rest in ins if word == "RUN"]
    assert '["docker/install.sh", "/opt/keyroute"]' in runs
    assert '["docker/install.sh", "/opt/keyroute", "/dist"]' in runs
    assert all(r.startswith("[") for r in runs), "exec form only: no shell tricks"
    assert ("USER", "65532:65532") in final
    assert ("ENTRYPOINT", '["keyroute"]') in final
    env = " ".join(rest for word, rest in final if word == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env
    assert "PATH=/opt/keyroute/bin:" in env
    exposed = {int(p) for word, rest in final if word == "EXPOSE" for p in rest.split()}
    assert exposed == {8411, 8412, 8080, 8081, 9443}
    assert ("COPY", "--from=builder /opt/keyroute /opt/keyroute") in final
    assert not [word for word, _ in final if word == "RUN"], "the final stage installs nothing"


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [x.strip() for x in lines if x.strip() and not x.startswith("#")]


def ignored(path: str) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(p, pat) for pat in dockerignore() for p in prefixes)


def copied_sources() -> list[str]:
    out = []
    for word, rest in dockerfile_instructions():
        if word == "COPY" and not rest.startswith("--from"):
            out += [s.rstrip("/") for s in rest.split()[:-1]]
    return out


def test_dockerignore_keeps_local_state_out_and_the_build_inputs_in() -> None:
    for path in (".venv", ".tools", "tests", "bench/results", ".git", ".venv/bin/python"):
        assert ignored(path), path
    sources = copied_sources()
    assert sources == [
        "docker/install.sh",
        "requirements/image.txt",
        "pyproject.toml",
        "README.md",
        "operator",
    ]
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not ignored(src), f"{src} is COPYed but .dockerignore excludes it"


@pytest.mark.timeout(300)
def test_image_install_script_builds_a_working_keyroute(tmp_path: Path) -> None:
    """SLOW (~25 s; reaches PyPI): the image's install steps, run for real into a temporary venv.

    The build context holds exactly what the Dockerfile COPYs; the wheel is built as the builder
    stage builds it, and docker/install.sh installs the lock and the wheel with --no-deps, then
    `pip check` proves the lock complete. The installed `keyroute` must then work.
    """
    context = tmp_path / "context"
    for src in copied_sources():
        if (ROOT / src).is_dir():
            shutil.copytree(
                ROOT / src, context / src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
            )
        else:
            (context / src).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / src, context / src)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHON": sys.executable}
    env.pop("VIRTUAL_ENV", None)
    dist = tmp_path / "dist"

    def run(*cmd: str | Path, cwd: Path = context) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=240, check=False
        )
        assert out.returncode == 0, f"{cmd}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out

    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", dist, ".")
    assert [p.name for p in dist.iterdir()] == [f"keyroute-{project()['version']}-py3-none-any.whl"]
    venv = tmp_path / "opt-keyroute"
    run("sh", context / "docker" / "install.sh", venv)  # the dependency layer
    run("sh", context / "docker" / "install.sh", venv, dist)  # then the wheel

    installed = run(venv / "bin" / "python", "-m", "pip", "freeze", "--all").stdout
    frozen = pins_from_text(installed)
    lock = pins(LOCK)
    assert {k: v for k, v in frozen.items() if k in lock} == lock
    assert set(frozen) - set(lock) <= {"keyroute", "pip", "setuptools", "wheel"}, "only the lock is installed"

    keyroute = venv / "bin" / "keyroute"
    assert run(keyroute, "--version", cwd=tmp_path).stdout.strip() == f"keyroute {project()['version']}"
    check = run(keyroute, "check", "--manifests", ROOT / "examples", cwd=tmp_path).stdout
    assert "route  openai" in check
    # The image's Python runs the operator shell too: kopf and uvloop import from the venv alone.
    run(venv / "bin" / "python", "-c", "import kopf, uvloop, keyroute.cli", cwd=tmp_path)


def pins_from_text(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, version = line.partition("==")
        if sep:
            out[canonicalize_name(name)] = version
    return out
