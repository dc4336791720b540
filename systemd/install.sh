#!/usr/bin/env bash
# Install (or update) edge as a systemd service on a Raspberry Pi running Raspberry Pi OS
# Bookworm or Trixie, 64-bit. Safe to run again: every step checks first and keeps your settings.
#
#   sudo systemd/install.sh              install or update, then (re)start the box
#   systemd/install.sh --dry-run         only print what it would do (no root needed)
#
# What it does (docs/install.md explains each step):
#   1. apt packages: git, python3-venv, python3-picamera2, python3-lgpio (+ mosquitto with --mosquitto,
#      npm with --scratch-editor)
#   2. the system user "edge" (groups gpio and video), from systemd/edge.sysusers
#   3. the code in /opt/edge: this checkout is used in place when it is /opt/edge, else copied there
#   4. the venv /opt/edge/.venv (script/bootstrap; --system-site-packages so apt's picamera2 and
#      lgpio are visible), and /usr/local/bin/edge pointing at its `edge` command; with
#      --scratch-editor also the Scratch editor the box serves at /scratch/ (script/scratch-editor)
#   5. /etc/edge/config.yaml from config.yaml with store.path: /var/lib/edge/store (an existing
#      one is kept), an empty /etc/edge/mqtt-password if none, then `edge check-config`
#   6. /etc/systemd/system/edge.service, daemon-reload, enable, (re)start
set -euo pipefail

PREFIX=/opt/edge
ETC_DIR=/etc/edge
CONFIG=$ETC_DIR/config.yaml
PASSWORD=$ETC_DIR/mqtt-password
STORE=/var/lib/edge/store
UNIT=/etc/systemd/system/edge.service
SYSUSERS=/etc/sysusers.d/edge.conf
LINK=/usr/local/bin/edge
PACKAGES=(git python3-venv python3-picamera2 python3-lgpio)

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"

usage() {
    cat <<EOF
Usage: sudo $0 [options]

Install or update edge as a systemd service (see docs/install.md).

Options:
  --dry-run        print every step and command, change nothing (root not needed)
  --mosquitto      also install the mosquitto MQTT broker and its command line clients
  --scratch-editor also put the Scratch editor on the box (served at http://<box>:8080/scratch/
                   with the box's blocks, offline afterwards; needs npm and internet once)
  --no-apt         skip apt (packages already installed, or no internet for apt)
  --no-start       install and enable, but do not (re)start the service now
  --print-config   print the /etc/edge/config.yaml a fresh install would write, and exit
  -h, --help       this help
EOF
}

DRY_RUN=0
APT=1
START=1
PRINT_CONFIG=0
SCRATCH_EDITOR=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --mosquitto) PACKAGES+=(mosquitto mosquitto-clients) ;;
        --scratch-editor) PACKAGES+=(npm); SCRATCH_EDITOR=1 ;;
        --no-apt) APT=0 ;;
        --no-start) START=0 ;;
        --print-config) PRINT_CONFIG=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

step() { printf '\n==> %s\n' "$*"; }
say() { printf '    %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

# Run a command, or in --dry-run only show it.
run() {
    printf '    + %s\n' "$*"
    if [ "$DRY_RUN" = 0 ]; then
        "$@"
    fi
}

# The shipped config.yaml with the store moved to /var/lib/edge/store (a relative store.path
# would be relative to /etc/edge, which the service cannot write).
render_config() {
    local line='^  path: var/store\([[:space:]]*#.*\)\{0,1\}$'
    if ! grep -q "$line" "$SRC/config.yaml"; then
        die "config.yaml has no '  path: var/store' line under store: (update install.sh's render_config)"
    fi
    sed "s|$line|  path: $STORE|" "$SRC/config.yaml"
}

if [ "$PRINT_CONFIG" = 1 ]; then
    render_config
    exit 0
fi

if [ "$DRY_RUN" = 1 ]; then
    echo "edge install: dry run, nothing is changed"
elif [ "$(id -u)" != 0 ]; then
    die "run me as root: sudo $0   (or try: $0 --dry-run)"
fi
echo "edge install: from $SRC into $PREFIX"

arch="$(uname -m)"
if [ "$arch" != aarch64 ]; then
    say "note: this machine is $arch; edge is made for 64-bit Raspberry Pi OS (aarch64)."
fi

# --- 1. packages -----------------------------------------------------------------------------
step "1/6 apt packages: ${PACKAGES[*]}"
missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
if [ "$APT" = 0 ]; then
    say "skipped (--no-apt)${missing[*]:+; not installed: ${missing[*]}}"
elif [ ${#missing[@]} -eq 0 ]; then
    say "all installed"
else
    run apt-get update
    # No recommends: picamera2 would otherwise pull in the desktop preview libraries.
    run apt-get install -y --no-install-recommends "${missing[@]}"
fi

# --- 2. the user -----------------------------------------------------------------------------
step "2/6 system user edge (groups gpio, video)"
run install -D -m 0644 "$SRC/systemd/edge.sysusers" "$SYSUSERS"
if command -v systemd-sysusers >/dev/null 2>&1; then
    run systemd-sysusers "$SYSUSERS"
else
    # Without systemd-sysusers: the same with the shadow tools.
    for group in gpio video; do
        getent group "$group" >/dev/null || run groupadd --system "$group"
    done
    id -u edge >/dev/null 2>&1 || run useradd --system --user-group --home-dir /var/lib/edge \
        --no-create-home --shell /usr/sbin/nologin --comment "edge teachable camera box" edge
    run usermod --append --groups gpio,video edge
fi

# --- 3. the code -----------------------------------------------------------------------------
step "3/6 code in $PREFIX"
case "$PREFIX/" in
    /home/*|/root/*) die "$PREFIX is under /home or /root, which the service cannot see (ProtectHome=yes)" ;;
esac
if [ "$SRC" = "$PREFIX" ]; then
    say "using this checkout in place"
else
    say "copying $SRC (without its .venv and var/)"
    run mkdir -p "$PREFIX"
    if command -v rsync >/dev/null 2>&1; then
        run rsync -a --delete --exclude=/.venv --exclude='/.venv-*' --exclude=/var \
            --exclude=__pycache__ --exclude=.pytest_cache "$SRC/" "$PREFIX/"
    else
        run tar -C "$SRC" --exclude=./.venv --exclude='./.venv-*' --exclude=./var \
            --exclude=__pycache__ --exclude=.pytest_cache -cf "$PREFIX/.install.tar" .
        run tar -C "$PREFIX" --no-same-owner -xf "$PREFIX/.install.tar"
        run rm -f "$PREFIX/.install.tar"
    fi
    # Root owns the code; the box (user edge) can read it but not change it.
    run chown -R root:root "$PREFIX"
fi

# --- 4. the venv -----------------------------------------------------------------------------
step "4/6 venv $PREFIX/.venv"
cfg="$PREFIX/.venv/pyvenv.cfg"
if [ -e /usr/lib/python3/dist-packages/picamera2 ] && [ -f "$cfg" ] \
        && ! grep -q '^include-system-site-packages = true' "$cfg"; then
    # An old venv made before picamera2 was installed cannot see it: make it again.
    say "the existing venv cannot see apt's picamera2/lgpio: recreating it"
    run rm -rf "$PREFIX/.venv"
fi
# The system's Python, which every user can run (not one from a private folder such as ~/.pyenv).
run env PYTHON=/usr/bin/python3 "$PREFIX/script/bootstrap"
if ! (cd / && run runuser -u edge -- "$PREFIX/.venv/bin/python" -c 'import edge'); then
    die "the user edge cannot run $PREFIX/.venv/bin/python; is its Python in a private folder?"
fi
run ln -sfn "$PREFIX/.venv/bin/edge" "$LINK"
if [ "$SCRATCH_EDITOR" = 1 ]; then
    say "the Scratch editor for http://<box>:8080/scratch/ (docs/web.md)"
    run "$PREFIX/script/scratch-editor" "$PREFIX/var/scratch-editor"
fi

# --- 5. the settings -------------------------------------------------------------------------
step "5/6 settings in $ETC_DIR"
run install -d -m 0755 "$ETC_DIR"
if [ -e "$CONFIG" ]; then
    say "keeping your $CONFIG"
    # The box must be able to read it (the owner and mode of a fresh one are root:edge 0640).
    run chgrp edge "$CONFIG"
    run chmod g+r "$CONFIG"
else
    say "writing $CONFIG from config.yaml, with store.path: $STORE"
    if [ "$DRY_RUN" = 0 ]; then
        tmp="$(mktemp "$ETC_DIR/.config.yaml.XXXXXX")"
        render_config >"$tmp"
        chown root:edge "$tmp"
        chmod 0640 "$tmp"    # readable by the box; may hold an MQTT password one day
        mv "$tmp" "$CONFIG"
    else
        render_config >/dev/null    # still check that the store.path line can be rewritten
        printf '    + (write %s, owner root:edge, mode 0640)\n' "$CONFIG"
    fi
fi
if [ -e "$PASSWORD" ]; then
    say "keeping $PASSWORD"
else
    say "creating an empty $PASSWORD (root only; put the MQTT password there if your broker needs one)"
    run install -m 0600 -o root -g root /dev/null "$PASSWORD"
fi
say "checking the config"
check="$CONFIG"
if [ "$DRY_RUN" = 0 ] && [ ! -d /run/credentials/edge.service ] \
        && grep -q '^ *password_file: */run/credentials/' "$CONFIG"; then
    # The MQTT password credential exists only while the box runs: check everything else,
    # on a copy beside the original (so relative paths mean the same).
    say "(the MQTT password credential exists only while the box runs: checking without it)"
    check="$(mktemp "$ETC_DIR/.check-XXXXXX.yaml")"
    trap 'rm -f "$check"' EXIT
    sed 's|^\( *password_file:\).*|\1 null|' "$CONFIG" >"$check"
fi
if ! run "$PREFIX/.venv/bin/edge" check-config "$check"; then
    die "$CONFIG has a problem (the line above says which); fix it and run this script again"
fi

# --- 6. the service --------------------------------------------------------------------------
step "6/6 service edge.service"
run install -m 0644 "$PREFIX/systemd/edge.service" "$UNIT"
if [ "$DRY_RUN" = 0 ] && [ ! -d /run/systemd/system ]; then
    say "systemd is not running here (a container?): installed, but not enabled or started"
    exit 0
fi
run systemctl daemon-reload
run systemctl enable edge.service
if [ "$START" = 0 ]; then
    say "not started (--no-start); it starts at the next boot, or now with: sudo systemctl start edge"
    exit 0
fi
# Forget earlier failed starts (after 5 in 10 minutes systemd refuses to start it again).
run systemctl reset-failed edge.service || true
# restart, not start: an update must replace the running code. Waits for READY=1 (Type=notify).
if ! run systemctl restart edge.service; then
    die "the box did not start; see why with: journalctl -u edge -n 50 --no-pager"
fi
if [ "$DRY_RUN" = 0 ]; then
    systemctl --no-pager --lines=5 status edge.service || true
fi
echo
echo "edge is installed. Follow its log with: journalctl -u edge -f"
echo "Settings: $CONFIG (then: sudo systemctl restart edge). More: $PREFIX/docs/install.md"
