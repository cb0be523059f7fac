#!/usr/bin/env bash
# Install what is missing (see scripts/setup.sh), then run the whole test suite.
# Arguments go to pytest: ./scripts/test.sh -k reader -x
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh

# The lock-order checker (qcow/lockdep.py) is on for the whole suite, daemons included.
export QCOWFS_LOCKDEP=1

# One style, checked (configuration in pyproject.toml): a lint finding or an unformatted
# file fails the run.
ruff check --quiet . || { echo "test.sh: ruff check failed (ruff check --fix . fixes most)" >&2; exit 1; }
ruff format --check --quiet . || { echo "test.sh: unformatted files (run: ruff format .)" >&2; exit 1; }

rc=0
python -m pytest "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests: failing" >&2
    exit 1
fi
exit "$rc"
