#!/bin/sh
# Install keyroute's runtime into a virtualenv: the pinned dependencies of requirements/image.txt,
# then (when given) the keyroute wheel(s) found in WHEEL_DIR. The Dockerfile RUNs exactly this, and
# tests/unit/test_image.py runs it into a temporary directory, so CI exercises the image's install
# steps without a container engine.
#
#   docker/install.sh VENV [WHEEL_DIR]
#
# PYTHON picks the interpreter that creates the venv (default python3). Every dependency is pinned
# and installed with --no-deps: the lock is the whole truth, and `pip check` proves it complete.
set -eu

if [ "$#" -lt 1 ] || [ "$#" -gt 2 ]; then
    echo "usage: $0 VENV [WHEEL_DIR]" >&2
    exit 2
fi
venv=$1
wheels=${2:-}
here=$(cd "$(dirname "$0")" && pwd)
requirements=${KEYROUTE_REQUIREMENTS:-$here/../requirements/image.txt}

if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
pip="$venv/bin/python -m pip"
$pip install --quiet --no-deps --only-binary=:all: --requirement "$requirements"
if [ -n "$wheels" ]; then
    set -- "$wheels"/keyroute-*.whl
    if [ ! -f "$1" ]; then
        echo "$0: no keyroute-*.whl in $wheels" >&2
        exit 1
    fi
    $pip install --quiet --no-deps "$@"
fi
$pip check
