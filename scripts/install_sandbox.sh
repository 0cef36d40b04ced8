#!/usr/bin/env bash
# bubblewrap, the execution sandbox of `nld-lora eval` (code-running records): from the system's packages where the
# platform allows (Debian/Ubuntu as root or with sudo). Without it, execution scoring is refused unless opted in.
set -uo pipefail
command -v bwrap >/dev/null 2>&1 && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_sandbox: no apt-get here; install bubblewrap with your package manager" >&2
  exit 0
fi
run() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"; else return 1; fi; }
run apt-get install -y -q bubblewrap >/dev/null 2>&1 \
  || { run apt-get update -q >/dev/null 2>&1 && run apt-get install -y -q bubblewrap >/dev/null 2>&1; } \
  || echo "install_sandbox: could not install bubblewrap (needs root); execution scoring will be refused" >&2
exit 0
