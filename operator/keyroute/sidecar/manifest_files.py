"""Local mode, the file part: which manifest files ``--manifests PATH`` means, and reading them.

Kept apart from :mod:`keyroute.core.manifests` so the parsing and rendering stay pure and testable
without a filesystem. ``PATH`` is what you would give ``kubectl apply -f``: a file (any name), or a
directory whose ``*.yaml``, ``*.yml`` and ``*.json`` files are read in name order, not recursively.

Hidden files (a leading dot) are skipped: editors' lock and backup files, and the ``..data`` links a
ConfigMap or Secret volume keeps, so such a mounted directory works as ``PATH`` and its symlinked
files are read (and stat-ed for reload) through the links.
"""

from __future__ import annotations

from pathlib import Path

from keyroute.core.manifests import ManifestError

SUFFIXES = frozenset({".yaml", ".yml", ".json"})


def _list_dir(path: Path) -> list[Path]:
    """The manifest files of directory ``path``; raises ``OSError`` if it cannot be listed."""
    return sorted(
        p
        for p in path.iterdir()
        if p.suffix.lower() in SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def manifest_files(path: Path) -> list[Path]:
    """The files :func:`read_manifest_texts` would read, for watching them for changes.

    Never raises: a path that is missing or cannot be listed is returned as itself, so a watcher
    notices when it appears.
    """
    if path.is_dir():
        try:
            return _list_dir(path)
        except OSError:
            return [path]
    return [path]


def read_manifest_texts(path: Path) -> list[tuple[str, str]]:
    """``(file name, text)`` of every manifest file under ``path``, for :func:`parse_manifests`.

    Raises :class:`ManifestError` for a missing path, a directory without manifest files, or a file
    that cannot be read or is not UTF-8 text.
    """
    if not path.exists():
        raise ManifestError(f"{path}: no such file or directory")
    if path.is_dir():
        try:
            files = _list_dir(path)
        except OSError as e:
            raise ManifestError(f"cannot list {path}: {e.strerror or type(e).__name__}") from None
        if not files:
            raise ManifestError(f"{path}: no *.yaml, *.yml or *.json files in this directory")
    else:
        files = [path]
    texts: list[tuple[str, str]] = []
    for f in files:
        try:
            # utf-8-sig: a byte-order mark, as some Windows editors write, is not part of the YAML.
            text = f.read_text(encoding="utf-8-sig")
        except OSError as e:
            raise ManifestError(f"cannot read {f}: {e.strerror or type(e).__name__}") from None
        except UnicodeDecodeError as e:
            raise ManifestError(f"{f}: not UTF-8 text (invalid byte at offset {e.start})") from None
        texts.append((str(f), text))
    return texts
