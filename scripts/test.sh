#!/usr/bin/env bash
# Install what is missing (see scripts/setup.sh), then run the whole test suite.
# Arguments go to pytest: ./scripts/test.sh -k reader -x
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh

# The lock-order checker (qcow/lockdep.py) is on for the whole suite, daemons included.
export QCOWFS_LOCKDEP=1
rc=0
python -m pytest "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests: failing" >&2
    exit 1
fi
exit "$rc"
