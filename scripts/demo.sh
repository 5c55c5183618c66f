#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the demo iSCSI target on 127.0.0.1:3260.
# Extra arguments go to `storaged demo`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/setup.sh
exec .venv/bin/storaged demo "$@"
