#!/usr/bin/env bash
# Install pttd as a systemd service on a Raspberry Pi (Raspberry Pi OS Bookworm or Trixie,
# Debian 12 or 13):
#
#   sudo ./install.sh                 # cloud engine (AssemblyAI)
#   sudo ./install.sh --with-local    # plus the offline engine (pocketsphinx)
#
# Idempotent: re-running it upgrades pttd from this checkout and never overwrites
# /etc/pttd/pttd.toml or /etc/pttd/api-key. See docs/install.md.
set -euo pipefail
umask 022   # the venv and the unit must be readable by the pttd user, whatever root's umask is

prog=install.sh
usage() {
  cat <<EOF
usage: sudo ./$prog [options]

  --with-local      also install the [local] extra (pocketsphinx, the offline engine)
  --root DIR        install into DIR instead of / (also: DESTDIR=DIR); for tests and staging.
                    Users, files and the venv go under DIR; systemd is only told to enable the
                    unit in DIR (systemctl --root), nothing is started.
  --no-apt          do not install apt packages (they must be present already)
  --no-systemctl    do not run systemctl at all (no daemon-reload, enable or start)
  --python PATH     interpreter for the venv (default /usr/bin/python3, or \$PYTHON); it must be
                    the system Python so that --system-site-packages finds the apt python3-*
  -h, --help        this text

Steps: apt packages; user pttd (systemd-sysusers); /etc/pttd and an empty api-key
(systemd-tmpfiles); venv /opt/pttd/venv with pttd; /etc/pttd/pttd.toml if absent;
/etc/systemd/system/pttd.service; enable it; start (or restart) it when a key is present.
EOF
}

say()  { printf '%s: %s\n' "$prog" "$*"; }
warn() { printf '%s: warning: %s\n' "$prog" "$*" >&2; }
die()  { printf '%s: error: %s\n' "$prog" "$*" >&2; exit 1; }
trap 'printf "%s: error: command failed (exit %s) at line %s: %s\n" "$prog" "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR

# --- options ---------------------------------------------------------------------------------
ROOT=${DESTDIR:-}
APT=1
SYSTEMCTL=1
WITH_LOCAL=0
PYTHON=${PYTHON:-/usr/bin/python3}
while [ $# -gt 0 ]; do
  case $1 in
    --with-local)   WITH_LOCAL=1 ;;
    --no-apt)       APT=0 ;;
    --no-systemctl) SYSTEMCTL=0 ;;
    --root)         [ $# -ge 2 ] || { usage >&2; exit 2; }; ROOT=$2; shift ;;
    --root=*)       ROOT=${1#--root=} ;;
    --python)       [ $# -ge 2 ] || { usage >&2; exit 2; }; PYTHON=$2; shift ;;
    --python=*)     PYTHON=${1#--python=} ;;
    -h|--help)      usage; exit 0 ;;
    *)              printf '%s: unknown option: %s\n\n' "$prog" "$1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

[ "$(id -u)" -eq 0 ] || die "must run as root: sudo $0 $*"

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
for f in setup.cfg pyproject.toml daemon/pttd/__init__.py systemd/pttd.service \
         systemd/sysusers.d/pttd.conf systemd/tmpfiles.d/pttd.conf systemd/pttd.toml.example; do
  [ -e "$SRC/$f" ] || die "$SRC/$f is missing: run install.sh from a complete pttd checkout"
done

if [ -n "$ROOT" ]; then
  mkdir -p "$ROOT"
  ROOT=$(cd "$ROOT" && pwd)
  [ "$ROOT" = / ] && ROOT=""
fi

# Final paths (what the running system sees) and where they are written (under ROOT).
VENV=/opt/pttd/venv
UNIT=/etc/systemd/system/pttd.service
SYSUSERS=/usr/lib/sysusers.d/pttd.conf
TMPFILES=/usr/lib/tmpfiles.d/pttd.conf
CONF=/etc/pttd/pttd.toml
KEY=/etc/pttd/api-key
LINK=/usr/local/bin/pttd
R=$ROOT

# --- 1. apt packages -------------------------------------------------------------------------
# Always: python3-numpy so the venv uses the system numpy (no numpy build/download on a Pi Zero),
# alsa-utils for arecord/amixer, systemd for systemd-sysusers/-tmpfiles (always there on a Pi;
# not in a minimal image or chroot).
APT_PKGS="python3 python3-venv python3-numpy alsa-utils systemd"
# pttd's Python dependencies, from apt wherever the archive's version meets setup.cfg's minimum
# (the venv sees them: --system-site-packages): nothing to compile or download on the Pi, and
# the OS's security updates. Checked against the Debian 12 and 13 package lists:
#   python3-systemd    235 on both                        >= 234: used
#   python3-alsaaudio  0.10.0 on 13, 0.8.4 on 12          >= 0.10: used on 13; pip builds it on 12
#   python3-websocket  1.8.0 on 13, 1.2.3 on 12           >= 1.6
#   python3-websockets 15.0.1 on 13, 10.4 on 12           >= 12
#   python3-gpiozero   1.6.2 on Debian, 2.x on Raspberry Pi OS   >= 2.0: used on Pi OS
#   python3-lgpio      Raspberry Pi OS only (gpiozero's pin factory there); not in Debian
APT_PY="python3-systemd:234 python3-alsaaudio:0.10 python3-websocket:1.6 python3-websockets:12 python3-gpiozero:2.0 python3-lgpio:0"
# What pip needs to build the two compiled ones when apt's are too old (or absent)
BUILD_alsaaudio="gcc python3-dev libasound2-dev"
BUILD_systemd="gcc python3-dev pkg-config libsystemd-dev"
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
candidate() {   # the version apt would install, or nothing
  apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: *//p' | grep -vx '(none)' || true
}
at_least() { [ -n "$1" ] && dpkg --compare-versions "$1" ge "$2"; }

if [ "$APT" = 1 ]; then
  { command -v apt-get && command -v dpkg-query; } >/dev/null ||
    die "apt-get not found: install the equivalents of '$APT_PKGS' yourself, then re-run with --no-apt"
  updated=0
  apt_update() {
    [ "$updated" = 1 ] && return 0
    say "apt-get update"
    apt-get update -qq || die "apt-get update failed: check the network and /etc/apt/sources.list*"
    updated=1
  }
  need=()
  for p in $APT_PKGS; do installed "$p" || need+=("$p"); done
  [ ${#need[@]} -eq 0 ] || apt_update
  build=()
  for spec in $APT_PY; do
    p=${spec%%:*} min=${spec#*:}
    if installed "$p" && at_least "$(dpkg-query -W -f='${Version}' "$p")" "$min"; then
      continue
    fi
    v=$(candidate "$p")
    if ! at_least "$v" "$min" && [ "$updated" = 0 ]; then apt_update; v=$(candidate "$p"); fi
    if at_least "$v" "$min"; then
      need+=("$p")
      continue
    fi
    case $p in
      python3-lgpio)
        say "python3-lgpio is not in the apt archive here: skipped (gpiozero will use another pin factory)" ;;
      python3-alsaaudio|python3-systemd)
        say "$p ${v:-absent} is older than $min here: pip builds it (installing the build packages)"
        # shellcheck disable=SC2206
        [ "$p" = python3-alsaaudio ] && build+=($BUILD_alsaaudio) || build+=($BUILD_systemd) ;;
      *)
        say "$p ${v:-absent} is older than $min here: pip installs it into the venv" ;;
    esac
  done
  for p in "${build[@]}"; do
    installed "$p" || [[ " ${need[*]} " == *" $p "* ]] || need+=("$p")
  done
  if [ ${#need[@]} -gt 0 ]; then
    apt_update
    say "apt-get install ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" ||
      die "apt-get install failed for: ${need[*]} (see above); fix apt, or install them and use --no-apt"
  else
    say "apt packages: all present"
  fi
fi

# --- checks that need no network --------------------------------------------------------------
for tool in systemd-sysusers systemd-tmpfiles install; do
  command -v "$tool" >/dev/null || die "$tool not found (package systemd / coreutils)"
done
[ -x "$PYTHON" ] || die "$PYTHON not found: install python3 (or pass --python PATH)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  die "$PYTHON is $("$PYTHON" -V 2>&1); pttd needs Python 3.11 or newer (Bookworm or later)"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null ||
  die "$PYTHON cannot create venvs: apt-get install python3-venv (or drop --no-apt)"

# --- 2. user and groups (systemd-sysusers) -----------------------------------------------------
install -D -m 0644 "$SRC/systemd/sysusers.d/pttd.conf" "$R$SYSUSERS"
mkdir -p "$R/etc"
sysusers=(systemd-sysusers)
[ -n "$ROOT" ] && sysusers+=("--root=$ROOT")
"${sysusers[@]}" pttd.conf || die "systemd-sysusers failed to create user pttd / group gpio (see above)"
# Members of audio and gpio, so that e.g. `sudo -u pttd pttd check` opens the mic and the pins
# like the unit does (it also sets SupplementaryGroups=audio gpio). sysusers creates a missing group.
"${sysusers[@]}" --inline 'm pttd audio' 'm pttd gpio' ||
  die "systemd-sysusers failed to add pttd to groups audio and gpio"
say "user pttd (groups pttd, audio, gpio): ok"

# --- 3. /etc/pttd and the key file (systemd-tmpfiles) -------------------------------------------
install -D -m 0644 "$SRC/systemd/tmpfiles.d/pttd.conf" "$R$TMPFILES"
tmpfiles=(systemd-tmpfiles --create)
[ -n "$ROOT" ] && tmpfiles+=("--root=$ROOT")
"${tmpfiles[@]}" pttd.conf || die "systemd-tmpfiles failed to create /etc/pttd (see above)"

# --- 4. /etc/pttd/pttd.toml, only if absent -----------------------------------------------------
if [ -n "$ROOT" ]; then
  gid=$(awk -F: '$1 == "pttd" { print $3 }' "$ROOT/etc/group")
else
  gid=$(getent group pttd | cut -d: -f3)
fi
[ -n "$gid" ] || die "group pttd not found after systemd-sysusers"
if [ -e "$R$CONF" ] || [ -L "$R$CONF" ]; then
  say "$CONF exists: kept as it is (the current defaults are in $SRC/systemd/pttd.toml.example)"
else
  install -m 0640 -o 0 -g "$gid" "$SRC/systemd/pttd.toml.example" "$R$CONF.new.$$"
  mv -n "$R$CONF.new.$$" "$R$CONF"   # -n: never replace one that appeared meanwhile
  rm -f "$R$CONF.new.$$"
  say "$CONF written (every key commented out at its default)"
fi

# --- 5. the venv and pttd -----------------------------------------------------------------------
pyver() { "$1" -c 'import sys; print(sys.version)' 2>/dev/null; }
if [ -d "$R$VENV" ]; then
  # A Python upgrade (or an earlier venv without system site-packages) means a fresh venv.
  if [ "$(pyver "$R$VENV/bin/python")" != "$(pyver "$PYTHON")" ] ||
     ! grep -qx 'include-system-site-packages = true' "$R$VENV/pyvenv.cfg" 2>/dev/null; then
    say "$VENV does not match $PYTHON ($("$PYTHON" -V)): recreating it"
    rm -rf "$R$VENV"
  fi
fi
if [ ! -d "$R$VENV" ]; then
  mkdir -p "$R$(dirname "$VENV")"
  "$PYTHON" -m venv --system-site-packages "$R$VENV" || die "could not create the venv $R$VENV"
  say "venv $VENV created (--system-site-packages)"
fi

# Build from a clean copy, so that the checkout gets no build/ or *.egg-info from root.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -C "$SRC" -c --exclude=.git --exclude=.venv --exclude=venv --exclude=build --exclude=dist \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache --exclude=.benchmarks \
    --exclude=test-artifacts . | tar -C "$work" -x
spec="$work" extra=""
if [ "$WITH_LOCAL" = 1 ]; then spec="${work}[local]" extra="[local]"; fi
say "pip install pttd$extra into $VENV (what apt had too old: a compiled one takes minutes on a Pi Zero)"
"$R$VENV/bin/python" -m pip install --disable-pip-version-check --no-warn-script-location "$spec" ||
  die "pip install failed (see above): check the network (PyPI/piwheels) and the build packages (re-run without --no-apt)"
"$R$VENV/bin/pttd" --version >/dev/null || die "$VENV/bin/pttd does not run after installing"
say "$("$R$VENV/bin/pttd" --version) installed in $VENV"
# `pttd` on the PATH (pttd status/press/events/check), unless something else is there already.
if [ -L "$R$LINK" ] || [ ! -e "$R$LINK" ]; then
  mkdir -p "$R$(dirname "$LINK")"
  ln -sfn "$VENV/bin/pttd" "$R$LINK"
else
  warn "$LINK exists and is not a symlink: left alone (use $VENV/bin/pttd)"
fi

# Validate the config with the installed pttd, and see whether a key is there to start with.
rc=0
state=$("$R$VENV/bin/python" - "$R$CONF" "$R$KEY" <<'EOF'
import sys
from pathlib import Path
from pttd.config import ConfigError, load_config
try:
    cfg = load_config(sys.argv[1], environ={})
except ConfigError as exc:
    print(exc)
    sys.exit(3)
key = Path(sys.argv[2])
has_key = key.is_file() and key.read_text(encoding="utf-8", errors="replace").strip() != ""
print("ready" if cfg.is_local or cfg.stt.api_key or has_key else "nokey")
EOF
) || rc=$?
conf_error=""
if [ $rc -eq 3 ]; then
  conf_error=$state
  state=invalid
elif [ $rc -ne 0 ]; then
  die "could not check $CONF with the installed pttd (exit $rc): $state"
fi

# --- 6. the unit --------------------------------------------------------------------------------
if cmp -s "$SRC/systemd/pttd.service" "$R$UNIT"; then
  say "$UNIT: unchanged"
else
  install -D -m 0644 "$SRC/systemd/pttd.service" "$R$UNIT"
  say "$UNIT installed"
fi

# --- 7. systemd: enable; start only when it can work --------------------------------------------
# Started (or restarted, on an upgrade) only with a key (or url = "local"): without one,
# `pttd run` exits 2 and the unit would sit in "failed" right after the install.
started=0
if [ "$SYSTEMCTL" = 0 ]; then
  say "--no-systemctl: systemd not told (run: systemctl daemon-reload && systemctl enable pttd)"
elif [ -n "$ROOT" ]; then
  systemctl --root="$ROOT" enable pttd.service || die "systemctl --root=$ROOT enable pttd failed"
  say "enabled in $ROOT (starts on boot there)"
elif [ -d /run/systemd/system ]; then
  systemctl daemon-reload || die "systemctl daemon-reload failed"
  systemctl enable pttd.service || die "systemctl enable pttd failed (see above)"
  if [ "$state" = invalid ]; then
    warn "pttd not (re)started: $conf_error"
  elif case $(systemctl is-active pttd.service 2>/dev/null || true) in
         active|activating|reloading) true ;; *) false ;; esac; then
    say "restarting pttd (running the new version)"
    systemctl restart pttd.service ||
      die "pttd did not become ready (mic, key, config?): journalctl -u pttd -n 50, then pttd check"
    started=1
  elif [ "$state" = ready ]; then
    say "starting pttd"
    systemctl start pttd.service ||
      die "pttd did not become ready (mic, key, config?): journalctl -u pttd -n 50, then pttd check"
    started=1
  else
    say "enabled; not started yet: no API key in $KEY"
  fi
else
  # A chroot (image build) or a container without systemd: enabling works offline.
  systemctl enable pttd.service || die "systemctl enable pttd failed (see above)"
  say "systemd is not running here: enabled, starts on the next boot"
fi

# --- 8. what next -------------------------------------------------------------------------------
echo
if [ "$state" = invalid ]; then
  printf '%s: error: %s\n  Fix it (defaults: %s), then: sudo systemctl restart pttd\n' \
    "$prog" "$conf_error" "$SRC/systemd/pttd.toml.example" >&2
  exit 1
fi
# `pttd check` by hand gets the key the way the unit does (LoadCredential), and runs as root
# so that it can open the mic and the pins; stop the service first, it holds both.
CHECK="sudo systemd-run --pty --wait --collect -p LoadCredential=assemblyai-api-key:$KEY $VENV/bin/pttd check"
if [ "$started" = 1 ]; then
  cat <<EOF
pttd is installed and running.
  systemctl status pttd
  journalctl -u pttd -f
  sudo systemctl stop pttd && $CHECK; sudo systemctl start pttd
EOF
else
  cat <<EOF
pttd is installed${ROOT:+ in $ROOT}. Next:
  1. Put your AssemblyAI API key in $KEY (paste it, then Enter and Ctrl-D):
       sudo install -m 0640 -o root -g pttd /dev/stdin $KEY
     (or set url = "local" in $CONF for the offline engine: install.sh --with-local)
  2. sudo systemctl restart pttd
  3. journalctl -u pttd -f
  4. Self-test (mic, button, LEDs, server, key), with the service stopped:
       sudo systemctl stop pttd && $CHECK; sudo systemctl start pttd
Settings: $CONF (every key commented out at its default).
EOF
fi
