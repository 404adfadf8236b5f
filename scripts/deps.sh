#!/usr/bin/env bash
# Installs the Debian 12 packages dsinfer builds against, if any are missing.
# Safe to run repeatedly; does nothing when everything is present.
set -euo pipefail
PKGS="build-essential cmake pkg-config libcjson-dev libcmocka-dev libpcre2-dev
      libmicrohttpd-dev libopenmpi-dev openmpi-bin libxxhash-dev liburing-dev
      libutf8proc-dev curl"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "deps: installing:$missing" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
