"""Write or check the generated CRD files: ``python -m keyroute.crdgen --write crds/`` / ``--check crds/``.

A thin shell around :mod:`keyroute.core.crds`, which builds the CRDs from the pydantic models and
does no I/O. ``--check`` exits 1 with a diff summary when the files in the folder are not exactly what
generation produces (a model changed and nobody regenerated, or someone edited a generated file);
``--write`` makes them so, and removes generated files no kind produces any more (files without the
generated-file header, such as a kustomization, are left alone).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path

from keyroute.core.crds import HEADER, rendered_files

_MAX_DIFF_LINES = 60
REGENERATE = "python -m keyroute.crdgen --write crds/"


def _stale(folder: Path, expected: set[str]) -> list[Path]:
    """Generated files (they carry :data:`HEADER`) in ``folder`` that generation no longer produces."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.glob("*.yaml")
        if p.name not in expected and p.read_text(encoding="utf-8").startswith(HEADER)
    )


def drift(folder: Path) -> list[str]:
    """What differs between ``folder`` and the generated files, one summary line per file (with a
    shortened unified diff under it); ``[]`` when they are equal."""
    expected = rendered_files()
    out: list[str] = []
    for name, text in expected.items():
        path = folder / name
        if not path.exists():
            out.append(f"{path}: missing")
            continue
        current = path.read_text(encoding="utf-8")
        if current == text:
            continue
        diff = list(
            difflib.unified_diff(
                current.splitlines(),
                text.splitlines(),
                fromfile=f"{path} (on disk)",
                tofile=f"{path} (generated)",
                lineterm="",
            )
        )
        changed = sum(1 for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---")))
        out.append(f"{path}: differs ({changed} lines)")
        shown = diff[:_MAX_DIFF_LINES]
        out.extend(f"    {line}" for line in shown)
        if len(diff) > len(shown):
            out.append(f"    ... {len(diff) - len(shown)} more diff lines")
    out.extend(f"{p}: generated file no kind produces any more" for p in _stale(folder, set(expected)))
    return out


def write(folder: Path) -> list[str]:
    """Make ``folder`` hold exactly the generated files; returns what was changed."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = rendered_files()
    changed: list[str] = []
    for name, text in expected.items():
        path = folder / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            changed.append(f"wrote {path}")
    for path in _stale(folder, set(expected)):
        path.unlink()
        changed.append(f"removed {path}")
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m keyroute.crdgen",
        description="Generate the keyroute CRDs from keyroute.core.resources.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", metavar="DIR", type=Path, help="write the CRD files into DIR")
    mode.add_argument("--check", metavar="DIR", type=Path, help="exit 1 if DIR differs from generation")
    args = parser.parse_args(argv)
    if args.write is not None:
        for line in write(args.write) or [f"{args.write}: up to date"]:
            print(line)
        return 0
    problems = drift(args.check)
    if not problems:
        print(f"{args.check}: up to date")
        return 0
    print(f"{args.check}: the CRDs differ from keyroute.core.resources:", file=sys.stderr)
    for line in problems:
        print(f"  {line}", file=sys.stderr)
    print(f"Regenerate them with: {REGENERATE}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
