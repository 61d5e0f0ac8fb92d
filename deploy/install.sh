#!/usr/bin/env bash
# Install nanoseg on a beamline host: a virtual environment, the configuration, the systemd
# units, the state directories and (optionally) an initial model. Idempotent: running it again
# upgrades the package, refreshes the units and the shipped config template, and never
# overwrites what an operator changed (daemon.yaml, keys, the `current` model).
#
#   sudo deploy/install.sh [--enable]
#   deploy/install.sh --destdir /tmp/stage --no-keys     # stage a tree (packaging, tests)
#
# Layout (PREFIX=/opt/nanoseg):
#   PREFIX/venv                      virtual environment with nanoseg and bluesky-0MQ-proxy
#   /etc/nanoseg/daemon.yaml         the daemon's config (from configs/daemon/beamline.yaml once)
#   /etc/nanoseg/daemon.yaml.dist    the shipped template, refreshed on every run
#   /etc/nanoseg/keys/               CurveZMQ keys of the control socket (server.key[_secret]),
#                                    keys/authorized/ holds the public keys of allowed clients
#   /etc/systemd/system/nanoseg.service, nanoseg-proxy.service
#   /var/lib/nanoseg                 results store, engine caches (the unit's StateDirectory)
#   /var/lib/nanoseg/models          model versions, read-only to the daemon; `current` -> one
#
# With --destdir everything goes below that directory, no user is created, nothing is chowned
# and systemctl is not called. The venv is created at its staged path: a Python venv is not
# relocatable, so a staged venv is for inspection and tests, not for copying to a host.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DESTDIR=""
PREFIX=/opt/nanoseg
PYTHON=python3
SOURCE=$REPO
PIP_ARGS=""
MODEL=""
SERVICE_USER=nanoseg
MAKE_KEYS=1
ENABLE=0

usage() {
    cat <<EOF
usage: $0 [options]
  --destdir DIR     stage below DIR (no user, no chown, no systemctl)
  --prefix DIR      install prefix of the venv (default $PREFIX)
  --python PY       Python >= 3.11 that creates the venv (default $PYTHON)
  --source SPEC     what pip installs: a source tree, a wheel or a requirement (default: this repo)
  --pip-args ARGS   extra pip arguments, e.g. "--no-index --find-links /srv/wheels" (offline hosts)
  --model FILE      a checkpoint to install as a model version (default: the repo's
                    models/default/model.pt when present); \`current\` is set only if absent
  --user NAME       service user and group (default $SERVICE_USER)
  --no-keys         do not create CurveZMQ keys for the control socket
  --enable          systemctl enable --now nanoseg-proxy.service nanoseg.service
EOF
}

while (($#)); do
    case $1 in
        --destdir) DESTDIR=${2%/}; shift 2 ;;
        --prefix) PREFIX=${2%/}; shift 2 ;;
        --python) PYTHON=$2; shift 2 ;;
        --source) SOURCE=$2; shift 2 ;;
        --pip-args) PIP_ARGS=$2; shift 2 ;;
        --model) MODEL=$2; shift 2 ;;
        --user) SERVICE_USER=$2; shift 2 ;;
        --no-keys) MAKE_KEYS=0; shift ;;
        --enable) ENABLE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

case $PREFIX in /*) ;; *) echo "install.sh: --prefix must be absolute" >&2; exit 2 ;; esac
if [[ -n $DESTDIR ]]; then
    mkdir -p "$DESTDIR"
    DESTDIR=$(cd "$DESTDIR" && pwd)
fi

VENV=$PREFIX/venv
ETC=/etc/nanoseg
STATE=/var/lib/nanoseg
UNITS=/etc/systemd/system
# Ownership is set only on a real install by root; a staged tree keeps the caller's.
OWN=0
if [[ -z $DESTDIR && $(id -u) -eq 0 ]]; then OWN=1; fi

say() { printf 'install.sh: %s\n' "$*"; }

# install -d/-m with optional owner; -C leaves identical files (and their mtimes) alone.
dir() {  # dir MODE OWNER:GROUP PATH
    install -d -m "$1" "$DESTDIR$3"
    if ((OWN)); then chown "$2" "$DESTDIR$3"; fi
    chmod "$1" "$DESTDIR$3"
}
file() {  # file MODE OWNER:GROUP SRC DEST
    install -C -m "$1" "$3" "$DESTDIR$4"
    if ((OWN)); then chown "$2" "$DESTDIR$4"; fi
}

create_user() {
    if ((!OWN)); then
        say "user $SERVICE_USER: skipped (staged install or not root)"
        return
    fi
    if ! getent group "$SERVICE_USER" >/dev/null; then
        groupadd --system "$SERVICE_USER"
    fi
    if ! getent passwd "$SERVICE_USER" >/dev/null; then
        useradd --system --gid "$SERVICE_USER" --home-dir "$STATE" --no-create-home \
            --shell /usr/sbin/nologin --comment "nanoseg daemon" "$SERVICE_USER"
        say "created system user $SERVICE_USER"
    fi
}

make_venv() {
    local py=$DESTDIR$VENV/bin/python
    dir 0755 root:root "$PREFIX"
    if [[ ! -x $py ]] || ! "$py" -c 'import sys' 2>/dev/null; then
        "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' ||
            { echo "install.sh: $PYTHON is older than 3.11" >&2; exit 1; }
        "$PYTHON" -m venv "$DESTDIR$VENV"
        say "created venv $DESTDIR$VENV"
    fi
    # shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
    "$py" -m pip install --quiet --disable-pip-version-check --upgrade-strategy only-if-needed \
        $PIP_ARGS "$SOURCE"
    if [[ -f $REPO/README.md ]]; then file 0644 root:root "$REPO/README.md" "$PREFIX/README.md"; fi
}

install_config() {
    dir 0750 "root:$SERVICE_USER" "$ETC"
    dir 0750 "root:$SERVICE_USER" "$ETC/keys"
    dir 0750 "root:$SERVICE_USER" "$ETC/keys/authorized"
    file 0640 "root:$SERVICE_USER" "$REPO/configs/daemon/beamline.yaml" "$ETC/daemon.yaml.dist"
    if [[ ! -e $DESTDIR$ETC/daemon.yaml ]]; then
        file 0640 "root:$SERVICE_USER" "$REPO/configs/daemon/beamline.yaml" "$ETC/daemon.yaml"
        say "wrote $DESTDIR$ETC/daemon.yaml (edit it; reruns keep it)"
    fi
    if ((MAKE_KEYS)) && [[ ! -e $DESTDIR$ETC/keys/server.key_secret ]]; then
        "$DESTDIR$VENV/bin/python" -c \
            'import sys, zmq.auth; zmq.auth.create_certificates(sys.argv[1], "server")' \
            "$DESTDIR$ETC/keys"
        if ((OWN)); then chown "root:$SERVICE_USER" "$DESTDIR$ETC"/keys/server.key*; fi
        chmod 0640 "$DESTDIR$ETC/keys/server.key_secret"
        chmod 0644 "$DESTDIR$ETC/keys/server.key"
        say "created CurveZMQ keys in $DESTDIR$ETC/keys (give clients server.key)"
    fi
}

install_units() {
    local unit tmp
    dir 0755 root:root "$UNITS"
    tmp=$(mktemp -d)
    for unit in nanoseg.service nanoseg-proxy.service; do
        # the units name /opt/nanoseg; another prefix is substituted, the rest stays verbatim
        sed "s#/opt/nanoseg#$PREFIX#g" "$REPO/systemd/$unit" >"$tmp/$unit"
        file 0644 root:root "$tmp/$unit" "$UNITS/$unit"
    done
    rm -rf "$tmp"
}

install_state() {
    dir 0750 "$SERVICE_USER:$SERVICE_USER" "$STATE"
    dir 0755 "root:$SERVICE_USER" "$STATE/models"
    dir 0750 "$SERVICE_USER:$SERVICE_USER" /var/cache/nanoseg
    local model=$MODEL
    if [[ -z $model && -f $REPO/models/default/model.pt ]]; then model=$REPO/models/default/model.pt; fi
    if [[ -n $model ]]; then
        local name
        name=$(basename "$(dirname "$(realpath "$model")")")
        dir 0755 "root:$SERVICE_USER" "$STATE/models/$name"
        file 0644 "root:$SERVICE_USER" "$model" "$STATE/models/$name/model.pt"
        if [[ ! -e $DESTDIR$STATE/models/current && ! -L $DESTDIR$STATE/models/current ]]; then
            ln -s "$name" "$DESTDIR$STATE/models/current"
            say "models/current -> $name"
        fi
    fi
}

reload_systemd() {
    if [[ -n $DESTDIR || ! -d /run/systemd/system ]]; then
        say "systemctl: skipped (staged install or systemd not running)"
        return
    fi
    systemctl daemon-reload
    if ((ENABLE)); then
        systemctl enable --now nanoseg-proxy.service nanoseg.service
    else
        say "start with: systemctl enable --now nanoseg-proxy.service nanoseg.service"
    fi
}

create_user
make_venv
install_config
install_units
install_state
reload_systemd
say "done: venv $DESTDIR$VENV, config $DESTDIR$ETC, state $DESTDIR$STATE"
