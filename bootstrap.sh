#!/usr/bin/env bash
# Set up pttd on a fresh Debian 12/13 or Raspberry Pi OS Bookworm/Trixie machine, then run something.
#   ./bootstrap.sh demo   apt packages + a venv in .venv, then `pttd demo` (offline, no hardware)
#   ./bootstrap.sh test   the same plus test tools, then the whole test suite
#   ./bootstrap.sh lint   the same, then ruff, ruff format --check, mypy and the size limits
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"
what=${1:-demo}
shift || true
case "$what" in
  demo|test|lint) ;;
  *) echo "usage: $0 demo|test|lint [args]" >&2; exit 2 ;;
esac

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
step() { printf 'bootstrap.sh: %s\n' "$*"; }
fail() { printf 'bootstrap.sh: error: %s\n' "$*" >&2; exit 1; }

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
for pkg in $APT_RUNTIME $([ "$what" != demo ] && echo "$APT_TEST"); do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  step "installing ${#need[@]} apt packages (${need[*]}): a minute or more, longer on a Pi"
  $SUDO apt-get update -qq || fail "apt-get update failed (see above): check the network and /etc/apt/sources.list*"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" ||
    fail "apt-get install failed (see above) for: ${need[*]}"
fi

# pip's own error is printed as it happens (-q keeps errors); this adds which step failed.
pip_install() {
  local why=$1; shift
  .venv/bin/python -m pip install -q --disable-pip-version-check "$@" ||
    fail "pip could not install $why (its error is above). A compile error names the missing \
build package (apt); a network error, the package index in pip's configuration (pip config list)."
}

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  step "creating the virtual environment .venv ($("$PY" -V 2>&1))"
  "$PY" -m venv .venv || fail "$PY -m venv .venv failed (see above): is python3-venv installed?"
fi
case "$what" in
  demo)
    step "installing Python packages into .venv: under a minute on a PC, a few minutes on a Pi Zero (pyalsaaudio and systemd-python compile there)"
    pip_install "pip itself" --upgrade pip
    pip_install "pttd with the offline engine ([local]: pocketsphinx)" -e '.[local]'
    step "running pttd demo: offline, about 40 s (no Pi, mic, key or internet needed)"
    code=0
    .venv/bin/pttd demo "$@" || code=$?
    [ "$code" -eq 0 ] || fail "pttd demo exited $code (see above)"
    ;;
  lint)
    step "installing Python packages (pttd and the test tools) into .venv"
    pip_install "pip itself" --upgrade pip
    pip_install "pttd with its test extra (local, mqtt, type, lint and the test tools)" -e '.[test]'
    step "ruff check, ruff format --check (ruff.toml), mypy (setup.cfg), size limits"
    .venv/bin/ruff check -q && .venv/bin/ruff format --check -q && .venv/bin/mypy &&
      .venv/bin/python scripts/check_sizes.py || fail "a style, type or size check failed (above)"
    step "lint: all clean"
    ;;
  test)
    step "installing Python packages (pttd and the test tools) into .venv: a minute on a PC, more on a Pi"
    pip_install "pip itself" --upgrade pip
    pip_install "pttd with its test extra (local, mqtt, type, lint and the test tools)" -e '.[test]'
    # playwright-core for the kiosk browser test (it downloads no browser); installed only when
    # the lock file changed since the last install, so re-runs stay quick and offline
    if [ ! -f tests/browser/node_modules/.package-lock.json ] ||
       [ tests/browser/package-lock.json -nt tests/browser/node_modules/.package-lock.json ]; then
      step "installing playwright-core from npm for the kiosk browser test"
      npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error ||
        fail "npm ci in tests/browser failed (see above)"
    fi
    step "running the test suite: about 10 minutes on a 2-core PC"
    exec .venv/bin/python -m pytest "$@"
    ;;
esac
