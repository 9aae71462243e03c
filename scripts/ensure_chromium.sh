#!/usr/bin/env bash
# Browser tests drive the system's Chromium through Playwright (`playwright install` cannot
# download a browser here). No-op when it is installed; installs Debian's package as root.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "Browser tests need Chromium at /usr/bin/chromium: run 'sudo apt-get install -y chromium'." >&2
    exit 1
fi
echo "Installing Chromium for the browser tests (apt-get install -y chromium)…"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
test -x /usr/bin/chromium
