#!/usr/bin/env bash
# The site agent's tests start real containers with podman and runc, from an image built from
# busybox-static (no registry is needed). No-op when they are installed; installs Debian's
# packages as root. Podman is configured per run through scripts/podman/containers.conf.
set -euo pipefail

if command -v podman >/dev/null && command -v runc >/dev/null && [ -x /bin/busybox ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "Container tests need podman, runc and busybox-static: run 'sudo apt-get install -y podman runc busybox-static'." >&2
    exit 1
fi
echo "Installing podman, runc and busybox-static for the container tests (apt-get)…"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq podman runc busybox-static >/dev/null
command -v podman >/dev/null && command -v runc >/dev/null && test -x /bin/busybox
