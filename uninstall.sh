#!/usr/bin/env bash
# Remove what install.sh installed:  sudo ./uninstall.sh [--purge]
#
# Stops and disables pttd, removes the unit, the venv (/opt/pttd), the /usr/local/bin/pttd link
# and the sysusers/tmpfiles snippets. Keeps /etc/pttd (config and API key) and /var/lib/pttd (the
# spool: presses waiting for the network, the user's speech) unless --purge.
# Keeps the pttd user and groups (systemd-sysusers users are never deleted automatically: files
# may still belong to them); remove by hand with `userdel pttd` if you want.
# Idempotent: running it again, or on a system without pttd, does nothing and exits 0.
set -euo pipefail

prog=uninstall.sh
usage() {
  cat <<EOF
usage: sudo ./$prog [options]

  --purge           also remove /etc/pttd (pttd.toml and the API key), unit drop-ins
                    (/etc/systemd/system/pttd.service.d) and /var/lib/pttd (the spool of
                    presses waiting for the network)
  --root DIR        uninstall from DIR instead of / (also: DESTDIR=DIR)
  --no-systemctl    do not run systemctl (no stop, disable or daemon-reload)
  -h, --help        this text
EOF
}

say()  { printf '%s: %s\n' "$prog" "$*"; }
die()  { printf '%s: error: %s\n' "$prog" "$*" >&2; exit 1; }
trap 'printf "%s: error: command failed (exit %s) at line %s: %s\n" "$prog" "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR

ROOT=${DESTDIR:-}
SYSTEMCTL=1
PURGE=0
while [ $# -gt 0 ]; do
  case $1 in
    --purge)        PURGE=1 ;;
    --no-systemctl) SYSTEMCTL=0 ;;
    --root)         [ $# -ge 2 ] || { usage >&2; exit 2; }; ROOT=$2; shift ;;
    --root=*)       ROOT=${1#--root=} ;;
    -h|--help)      usage; exit 0 ;;
    *)              printf '%s: unknown option: %s\n\n' "$prog" "$1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

[ "$(id -u)" -eq 0 ] || die "must run as root: sudo $0 $*"
if [ -n "$ROOT" ]; then
  [ -d "$ROOT" ] || die "--root $ROOT: no such directory"
  ROOT=$(cd "$ROOT" && pwd)
  [ "$ROOT" = / ] && ROOT=""
fi
R=$ROOT
UNIT=/etc/systemd/system/pttd.service

# --- systemd: stop and disable ---------------------------------------------------------------
if [ "$SYSTEMCTL" = 1 ]; then
  if [ -n "$ROOT" ]; then
    if [ -e "$R$UNIT" ]; then
      systemctl --root="$ROOT" disable pttd.service || die "systemctl --root=$ROOT disable pttd failed"
    fi
  elif [ -d /run/systemd/system ]; then
    if systemctl cat pttd.service >/dev/null 2>&1; then
      say "stopping and disabling pttd"
      systemctl disable --now pttd.service || die "systemctl disable --now pttd failed (see above)"
    fi
  elif [ -e "$UNIT" ]; then
    systemctl disable pttd.service || die "systemctl disable pttd failed (see above)"   # offline (chroot)
  fi
fi
# Leftover enablement links (e.g. after --no-systemctl, or a WantedBy= changed by a drop-in).
for link in "$R"/etc/systemd/system/*.wants/pttd.service "$R"/etc/systemd/system/*.requires/pttd.service; do
  if [ -L "$link" ]; then rm -f "$link"; say "removed ${link#"$R"}"; fi
done

# --- files -----------------------------------------------------------------------------------
remove() {
  local path
  for path in "$@"; do
    if [ -e "$R$path" ] || [ -L "$R$path" ]; then
      rm -rf -- "$R$path"
      say "removed $path"
    fi
  done
}
remove "$UNIT" /opt/pttd /usr/lib/sysusers.d/pttd.conf /usr/lib/tmpfiles.d/pttd.conf
# /usr/local/bin/pttd only when it is install.sh's link into the venv.
if [ -L "$R/usr/local/bin/pttd" ] && [ "$(readlink "$R/usr/local/bin/pttd")" = /opt/pttd/venv/bin/pttd ]; then
  remove /usr/local/bin/pttd
fi

if [ "$PURGE" = 1 ]; then
  remove /etc/pttd /etc/systemd/system/pttd.service.d /var/lib/pttd
else
  if [ -d "$R/etc/pttd" ]; then say "kept /etc/pttd (config and API key): remove it with --purge"; fi
  if [ -d "$R/var/lib/pttd" ]; then say "kept /var/lib/pttd (presses waiting to be sent): remove it with --purge"; fi
fi

if [ "$SYSTEMCTL" = 1 ] && [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload || die "systemctl daemon-reload failed"
  systemctl reset-failed pttd.service 2>/dev/null || true   # forget an old failed state, if any
fi
say "done (user and group pttd kept: 'userdel pttd' removes them)"
