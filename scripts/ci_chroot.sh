#!/usr/bin/env bash
# Prove pttd on Debian 13 "trixie" (Python 3.13, the base of today's Raspberry Pi OS) from this
# Debian 12 machine: build a fresh `debootstrap --variant=minbase` chroot from the Debian archive
# that apt here already uses, give it this machine's apt sources (adapted to trixie), CA
# certificates and pip/npm configuration, copy the checkout in, and run there, as a new user
# would: `./bootstrap.sh demo`, `./install.sh --root DIR --no-systemctl`, `./bootstrap.sh test`.
#
#   sudo scripts/ci_chroot.sh                  # all of it, in a new chroot removed at the end
#   sudo scripts/ci_chroot.sh -- STEP...       # only these steps: demo install test shell
#   sudo scripts/ci_chroot.sh -- test -k stop  # `test` takes the rest as pytest arguments
#   PTTD_CHROOT_DIR=/var/tmp/trixie ...        # keep the chroot there and reuse it next time
#                                              # (re-made when it is not a finished one)
#
# Mounts (/proc, /sys, /dev, a tmpfs /run and /tmp) are made inside a private mount namespace
# (unshare --mount) so the rest of the machine never sees them: they go away with the last
# process in the chroot, even when a step fails or this script is killed, and removing the
# chroot directory afterwards cannot reach into the host's /dev or /sys.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$(pwd)
prog=ci_chroot.sh
SUITE=${PTTD_CHROOT_SUITE:-trixie}
say() { printf '%s: %s\n' "$prog" "$*"; }
die() { printf '%s: error: %s\n' "$prog" "$*" >&2; exit 1; }
stamp() { date +%s; }

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot, mounts)"
steps=()
if [ "${1:-}" = "--" ]; then shift; steps=("$@"); fi
[ ${#steps[@]} -gt 0 ] || steps=(demo install test)

# --- the host's Debian archive ------------------------------------------------------------------
. /etc/os-release
HOST_CODENAME=${VERSION_CODENAME:?/etc/os-release has no VERSION_CODENAME}
# The URIs apt fetches this release (and its security suite) from, as apt itself resolved them.
targets=$(apt-get indextargets --format '$(REPO_URI) $(CODENAME) $(TARGET_OF)' 2>/dev/null | sort -u)
MIRROR=$(awk -v c="$HOST_CODENAME" '$2 == c && $3 == "deb" { print $1; exit }' <<<"$targets")
[ -n "$MIRROR" ] || die "apt here has no 'deb' source for $HOST_CODENAME (see /etc/apt/sources.list*)"
proxy=$(apt-config shell P Acquire::http::Proxy | sed -n "s/^P='\(.*\)'$/\1/p")
if [ -n "$proxy" ] && [ "$proxy" != DIRECT ]; then export http_proxy=$proxy; fi

command -v debootstrap >/dev/null || {
  say "installing debootstrap"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}
[ -e "/usr/share/debootstrap/scripts/$SUITE" ] || die "this debootstrap does not know $SUITE"

# --- the chroot ---------------------------------------------------------------------------------
KEEP=0
if [ -n "${PTTD_CHROOT_DIR:-}" ]; then
  CH=$PTTD_CHROOT_DIR
  KEEP=1
else
  CH=$(mktemp -d /var/tmp/pttd-$SUITE-XXXXXX)
fi
cleanup() {
  local rc=$?
  if [ "$KEEP" = 0 ] && [ -d "$CH" ]; then
    # nothing is mounted below $CH in this namespace (see above); --one-file-system regardless
    rm -rf --one-file-system "$CH" || printf '%s: warning: could not remove %s\n' "$prog" "$CH" >&2
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

t0=$(stamp)
if [ ! -e "$CH/.pttd-ci-base" ]; then
  rm -rf --one-file-system "$CH"
  mkdir -p "$CH"
  say "debootstrap --variant=minbase $SUITE from $MIRROR into $CH (about a minute)"
  debootstrap --variant=minbase "$SUITE" "$CH" "$MIRROR" > "$CH.debootstrap.log" 2>&1 || {
    tail -30 "$CH.debootstrap.log" >&2
    die "debootstrap failed (log above; the whole log: $CH.debootstrap.log)"
  }
  rm -f "$CH.debootstrap.log"
  touch "$CH/.pttd-ci-base"
  say "debootstrap: $(( $(stamp) - t0 )) s"
else
  say "reusing the chroot in $CH"
fi

# apt sources: the host's entries for its Debian release, with the codename changed.
# (Other repositories stay out: they are built for the host's release.)
sources=$(mktemp)
{
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    grep -E "^[[:space:]]*deb[[:space:]].*[[:space:]]$HOST_CODENAME(-[a-z]+)?([[:space:]]|$)" "$f" || true
  done
} | sed -E "s/([[:space:]])$HOST_CODENAME(-[a-z]+)?([[:space:]]|$)/\1$SUITE\2\3/" > "$sources"
rm -f "$CH/etc/apt/sources.list"
mkdir -p "$CH/etc/apt/sources.list.d"
rm -f "$CH"/etc/apt/sources.list.d/*
[ -s "$sources" ] && cp "$sources" "$CH/etc/apt/sources.list.d/host-adapted.list"
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  # deb822 stanzas (blank-line separated) of the host's release; Suites renamed
  awk -v RS= -v ORS='\n\n' -v c="$HOST_CODENAME" '
    $0 ~ ("(^|\n)Suites:([^\n]*[ \t])?" c "(-[a-z]+)?([ \t\n]|$)") && $0 ~ /(^|\n)Types:[^\n]*deb([ \t\n]|$)/' "$f" |
    sed -E "/^Suites:/ s/([[:space:]])$HOST_CODENAME(-[a-z]+)?\b/\1$SUITE\2/g" > "$sources"
  if [ -s "$sources" ]; then
    cp "$sources" "$CH/etc/apt/sources.list.d/host-adapted-$(basename "$f")"
    # keyrings they name (Signed-By) come along when the chroot has none at that path
    sed -n 's/^Signed-By:[[:space:]]*\(\/[^[:space:]]*\)/\1/p' "$sources" | while read -r key; do
      [ -e "$CH$key" ] || { [ -f "$key" ] && install -D -m 0644 "$key" "$CH$key"; } || true
    done
  fi
done
rm -f "$sources"
ls "$CH"/etc/apt/sources.list.d/host-adapted* >/dev/null 2>&1 || die "no apt source for $SUITE"
# how apt reaches the archive (proxy, Check-Valid-Until, ...): the host's Acquire settings
for f in /etc/apt/apt.conf /etc/apt/apt.conf.d/*; do
  [ -f "$f" ] && grep -q 'Acquire' "$f" && install -m 0644 "$f" "$CH/etc/apt/apt.conf.d/50host-$(basename "$f")"
done
# names and certificates: the host's resolver, CA bundle and local CAs
cp -L /etc/resolv.conf "$CH/etc/resolv.conf" 2>/dev/null || true
[ -f "$CH/etc/hosts" ] || printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' > "$CH/etc/hosts"
# pip and npm configuration (system, XDG and root's own); local paths they name are bound read-only
for f in /etc/pip.conf /etc/xdg/pip /root/.config/pip /root/.pip /etc/npmrc /usr/etc/npmrc /root/.npmrc; do
  [ -e "$f" ] || continue
  mkdir -p "$CH$(dirname "$f")"
  rm -rf "${CH:?}$f"
  cp -a "$f" "$CH$f"
done
binds=()
for v in $( (cat /etc/pip.conf /etc/xdg/pip/*.conf /root/.config/pip/pip.conf /root/.pip/pip.conf 2>/dev/null
             env | sed -n 's/^PIP_[A-Z_]*=//p') | grep -oE '(file://)?/[^[:space:]"'"'"']+' | sed 's|^file://||'); do
  # an index's links may point anywhere in its tree: bind the top directory (/opt/NAME, ...)
  case "$v" in /opt/?*|/srv/?*|/mnt/?*) v=$(cut -d/ -f1-3 <<<"$v") ;; *) continue ;; esac
  [ -d "$v" ] && [[ " ${binds[*]} " != *" $v "* ]] && binds+=("$v")
done

say "apt sources for $SUITE: $(cat "$CH"/etc/apt/sources.list.d/host-adapted* | grep -oE '(deb |URIs: )[^ ]*' | sort -u | tr '\n' ' ')"

# The checkout: tracked and untracked (not ignored) files, as a clean clone would have them.
rm -rf --one-file-system "$CH/srv/pttd"
mkdir -p "$CH/srv/pttd"
git -C "$SRC" ls-files -z --cached --others --exclude-standard |
  tar -C "$SRC" --null --no-recursion --ignore-failed-read -T - -cf - 2>/dev/null |
  tar -C "$CH/srv/pttd" -xf -

# The environment inside: nothing of the host's but what reaches the indexes and CI's flag.
envs=(HOME=/root LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
      TERM=dumb DEBIAN_FRONTEND=noninteractive)
while IFS= read -r kv; do envs+=("$kv"); done < <(env | grep -E '^(PIP_|npm_config_|NPM_CONFIG_|CI=|(http|https|no|HTTP|HTTPS|NO)_PROXY=|SSL_CERT_|REQUESTS_CA_BUNDLE=)' || true)

# --- the steps, run in the chroot -----------------------------------------------------------------
cat > "$CH/root/ci-steps.sh" <<'EOF'
#!/bin/bash
# Written by scripts/ci_chroot.sh: one step per argument, in /srv/pttd (world-readable: tests run pttd as nobody).
set -euo pipefail
cd /srv/pttd
say() { printf 'ci_chroot.sh (in the chroot): %s\n' "$*"; }
prepare() {
  # CA certificates first, so pip can verify whatever index it is configured with
  if [ ! -e /etc/ssl/certs/.pttd-host ]; then
    say "apt-get install ca-certificates"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends ca-certificates >/dev/null
    touch /etc/ssl/certs/.pttd-host
  fi
  cp /root/host-ca/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
}
prepare
say "$(. /etc/os-release; echo "$PRETTY_NAME"), $(python3 -V 2>/dev/null || echo 'no python3 yet')"
while [ $# -gt 0 ]; do
  step=$1; shift
  t0=$(date +%s)
  case $step in
    demo)
      say "./bootstrap.sh demo"
      ./bootstrap.sh demo 2>&1 | tee /tmp/demo.out
      finals=$(grep -c " heard '[^']" /tmp/demo.out || true)
      [ "$finals" -gt 0 ] || { echo "ci_chroot.sh: pttd demo printed no final" >&2; exit 1; }
      say "demo: exit 0, $finals clips with a final, $(( $(date +%s) - t0 )) s"
      ;;
    install)
      say "./install.sh --root /tmp/pttd-root --no-systemctl"
      rm -rf /tmp/pttd-root
      ./install.sh --root /tmp/pttd-root --no-systemctl
      /tmp/pttd-root/opt/pttd/venv/bin/pttd --version
      test -f /tmp/pttd-root/etc/systemd/system/pttd.service
      test -f /tmp/pttd-root/etc/pttd/pttd.toml
      grep -q '^pttd:' /tmp/pttd-root/etc/passwd
      /tmp/pttd-root/opt/pttd/venv/bin/python -c 'import gpiozero, alsaaudio, systemd.journal, numpy; print("imports ok:", gpiozero.__file__, systemd.journal.__file__, numpy.__file__)'
      say "install: ok, $(( $(date +%s) - t0 )) s"
      ;;
    test)
      say "./bootstrap.sh test $*"
      rc=0
      ./bootstrap.sh test "$@" || rc=$?
      say "test: exit $rc, $(( $(date +%s) - t0 )) s"
      [ "$rc" -eq 0 ] || exit "$rc"
      set --   # the rest were pytest arguments
      ;;
    shell)
      bash -i </dev/tty >/dev/tty 2>&1 || true
      ;;
    *)
      echo "ci_chroot.sh: unknown step $step (demo, install, test [pytest args], shell)" >&2
      exit 2
      ;;
  esac
done
EOF
chmod +x "$CH/root/ci-steps.sh"
mkdir -p "$CH/root/host-ca"
cp -L /etc/ssl/certs/ca-certificates.crt "$CH/root/host-ca/ca-certificates.crt"
if [ -d /usr/local/share/ca-certificates ]; then
  mkdir -p "$CH/usr/local/share/ca-certificates"
  cp -a /usr/local/share/ca-certificates/. "$CH/usr/local/share/ca-certificates/"
fi

say "running in the chroot: ${steps[*]}"
t1=$(stamp)
rc=0
# shellcheck disable=SC2016
unshare --mount --propagation private -- bash -euo pipefail -c '
  CH=$1; shift
  nb=$1; shift
  binds=("${@:1:$nb}"); shift "$nb"
  # the chroot'"'"'s / must be a mount point: `unshare --mount` in it (the journald tests) makes
  # / private, which fails with EINVAL on a plain directory
  mount --bind "$CH" "$CH"
  mount -t proc proc "$CH/proc"
  mount --rbind /sys "$CH/sys"
  mount --rbind /dev "$CH/dev"
  mount -t tmpfs -o mode=0755 tmpfs "$CH/run"
  mount -t tmpfs -o mode=1777 tmpfs "$CH/tmp"
  mkdir -p "$CH/run/lock" "$CH/run/user"
  for b in "${binds[@]}"; do
    mkdir -p "$CH$b" && mount --bind -o ro "$b" "$CH$b"
  done
  rc=0
  chroot "$CH" /usr/bin/env -i "$@" || rc=$?
  # not needed (the namespace goes with this process), but tidy: unmount in reverse order
  umount -R "$CH" 2>/dev/null || umount -R -l "$CH" 2>/dev/null || true
  exit $rc
' ci-chroot "$CH" "${#binds[@]}" "${binds[@]}" "${envs[@]}" /root/ci-steps.sh "${steps[@]}" || rc=$?
say "steps in the chroot: exit $rc, $(( $(stamp) - t1 )) s (all: $(( $(stamp) - t0 )) s)"
exit $rc
