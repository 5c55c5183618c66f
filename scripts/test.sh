#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint, then run the test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/test_fastio.py -x
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/setup.sh

printf '\033[1m==> %s\033[0m\n' "ruff check ."
.venv/bin/ruff check .

printf '\033[1m==> %s\033[0m\n' "pytest $*"
rc=0
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "ERROR: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
