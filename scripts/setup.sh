#!/usr/bin/env bash
# Fresh Debian 12, as root: install what is missing, build, run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/build.sh
exec build/dsinfer demo
