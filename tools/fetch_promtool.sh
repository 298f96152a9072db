#!/usr/bin/env bash
# promtool for tests/chart/test_observability.py (`promtool check rules`, `promtool test rules`).
#
# Debian's `prometheus` package ships it, a static Go binary: this extracts only that file into
# .tools/promtool/ rather than installing (and maybe starting) a Prometheus server. The package lists
# are refreshed once (`apt-get update`, as root) if the package cannot be found without. There is no
# PyPI package that ships promtool. Elsewhere: put promtool on PATH, or set KEYROUTE_PROMTOOL.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.tools/promtool
if [[ -x $dest/promtool ]]; then
  exit 0
fi
if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
  echo "fetch_promtool: no apt-get/dpkg-deb here; install promtool and put it on PATH (or set KEYROUTE_PROMTOOL)" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"  # apt's download sandbox user must be able to write there
download() { (cd "$tmp" && apt-get download -qq prometheus) >/dev/null 2>&1; }
if ! download; then
  if [[ $(id -u) != 0 ]]; then
    echo "fetch_promtool: 'apt-get download prometheus' failed; as root, run 'apt-get update' first" >&2
    exit 1
  fi
  apt-get update -qq >/dev/null
  download
fi
dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/pkg"
mkdir -p "$dest"
cp "$tmp/pkg/usr/bin/promtool" "$dest/promtool"
chmod 755 "$dest/promtool"
"$dest/promtool" --version | head -1
