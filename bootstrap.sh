#!/usr/bin/env bash
# Set up pttd on a fresh Debian 12 / Raspberry Pi OS Bookworm machine, then run something.
#   ./bootstrap.sh demo   apt packages + a venv in .venv, then `pttd demo` (offline, no hardware)
#   ./bootstrap.sh test   the same plus test tools, then the whole test suite
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"
what=${1:-demo}
shift || true

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# Build deps for pyalsaaudio and systemd-python; espeak-ng/sox make the demo's speech fixtures.
APT_RUNTIME="python3 python3-venv python3-dev gcc pkg-config libasound2-dev libsystemd-dev"
# Real parts the tests drive: alsa-lib's file plugin (alsa-utils for aplay/arecord),
# systemd-journald / systemd-analyze, util-linux's unshare, espeak-ng and sox for speech audio,
# mosquitto (+ mosquitto_passwd in mosquitto-clients, openssl for the TLS test) for MQTT, and
# the kernel headers python-evdev builds against.
APT_TEST="alsa-utils systemd util-linux espeak-ng sox mosquitto mosquitto-clients openssl linux-libc-dev"
# The kiosk browser test: Debian's chromium (+ a font for readable screenshots), driven by
# playwright-core from npm; Debian 12 packages npm apart from nodejs (NodeSource's nodejs has it).
APT_TEST="$APT_TEST chromium fonts-liberation"
command -v npm >/dev/null 2>&1 || APT_TEST="$APT_TEST nodejs npm"

need=()
for pkg in $APT_RUNTIME $([ "$what" = test ] && echo "$APT_TEST"); do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
case "$what" in
  demo)
    .venv/bin/python -m pip install -q -e '.[local]'
    exec .venv/bin/pttd demo "$@"
    ;;
  test)
    .venv/bin/python -m pip install -q -e '.[test,local,mqtt,type]'
    # playwright-core for the kiosk browser test (it downloads no browser); installed only when
    # the lock file changed since the last install, so re-runs stay quick and offline
    if [ ! -f tests/browser/node_modules/.package-lock.json ] ||
       [ tests/browser/package-lock.json -nt tests/browser/node_modules/.package-lock.json ]; then
      npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error
    fi
    exec .venv/bin/python -m pytest "$@"
    ;;
  *)
    echo "usage: $0 demo|test [args]" >&2
    exit 2
    ;;
esac
