"""Where a sidecar's config comes from: the operator-rendered file, or manifests in local mode.

Both are polled, not watched with inotify: a Kubernetes Secret volume is updated by swapping a
symlink, which a stat of the resolved files sees reliably on every filesystem, and a poll every
second costs nothing next to an LLM call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from keyroute.core.config import ConfigError, SidecarConfig, parse_config


class ConfigSource(Protocol):
    """Something that can say which files it reads and load a validated config from them."""

    def files(self) -> list[Path]: ...

    def load(self) -> SidecarConfig: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class RenderedConfigFile:
    """``--config FILE``: the JSON the operator renders into the chain's Secret (a directory: its config.json)."""

    path: Path

    def _file(self) -> Path:
        return self.path / "config.json" if self.path.is_dir() else self.path

    def files(self) -> list[Path]:
        return [self._file()]

    def load(self) -> SidecarConfig:
        try:
            text = self._file().read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read {self._file()}: {e.strerror or type(e).__name__}") from None
        return parse_config(text)

    def describe(self) -> str:
        return f"config file {self._file()}"


@dataclass(frozen=True)
class ManifestSource:
    """``--manifests PATH [--chain NAME]``: local mode, the YAML a user would ``kubectl apply``."""

    path: Path
    chain: str | None = None
    namespace: str | None = None

    def files(self) -> list[Path]:
        from keyroute.sidecar.manifest_files import manifest_files

        return manifest_files(self.path)

    def load(self) -> SidecarConfig:
        # Imported here: manifests are validated with pydantic, which a sidecar reading the
        # operator's rendered file never loads (its idle memory, issue 13).
        from keyroute.core.manifests import parse_manifests, render_manifests
        from keyroute.sidecar.manifest_files import read_manifest_texts

        manifests = parse_manifests(read_manifest_texts(self.path))
        return render_manifests(manifests, self.chain, self.namespace).config

    def describe(self) -> str:
        return f"manifests {self.path}"


@dataclass(frozen=True)
class StaticConfig:
    """A config given in code (tests, the demo)."""

    config: SidecarConfig

    def files(self) -> list[Path]:
        return []

    def load(self) -> SidecarConfig:
        return self.config

    def describe(self) -> str:
        return "static config"


def signature(files: list[Path]) -> tuple[tuple[str, int, int, int], ...]:
    """What changes when any of ``files`` changes (through symlinks, as Secret volumes update)."""
    out = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            out.append((str(f), -1, -1, -1))
            continue
        out.append((str(f), st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)
