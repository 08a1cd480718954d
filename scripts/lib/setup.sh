# Shared set-up for scripts/demo, scripts/test and scripts/bench: install what is
# missing on a fresh Debian machine, then make sure .venv holds enosfs and its extras.
# Sourced, not run. Idempotent: a second run installs nothing.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv"

say() { printf '%s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "need root to run: $* (install sudo or run as root)"
    fi
}

ensure_apt_packages() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
    say "installing ${missing[*]} ..."
    as_root env DEBIAN_FRONTEND=noninteractive timeout 600 apt-get update -qq \
        || die "apt-get update failed"
    as_root env DEBIAN_FRONTEND=noninteractive timeout 900 \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
}

ensure_fuse_device() {
    if [ ! -e /dev/fuse ]; then
        as_root modprobe fuse 2>/dev/null || true
    fi
    [ -e /dev/fuse ] || die "/dev/fuse is missing: this machine cannot mount FUSE filesystems"
}

find_python() {
    local py
    for py in python3.13 python3.12 python3.11 python3; do
        if command -v "$py" >/dev/null 2>&1 \
            && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$py"; return 0
        fi
    done
    return 1
}

ensure_venv() {
    local extras="$1" py stamp want
    if [ ! -x "$VENV/bin/python" ]; then
        py="$(find_python)" || { ensure_apt_packages python3 python3-venv; py="$(find_python)"; } \
            || die "enosfs needs Python 3.11 or newer"
        if ! "$py" -m venv "$VENV" 2>/dev/null; then
            ensure_apt_packages python3-venv
            "$py" -m venv "$VENV" || die "cannot create $VENV"
        fi
    fi
    stamp="$VENV/.enosfs-$extras"
    want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        say "installing enos-fuse[$extras] (enosfs) into $VENV ..."
        # The distribution was called enosfs before: both would own the enosfs command,
        # so a venv made then loses the old one first.
        if "$VENV/bin/python" -m pip show -q enosfs >/dev/null 2>&1; then
            "$VENV/bin/python" -m pip uninstall -y -q enosfs >/dev/null \
                || die "pip uninstall enosfs (the old name of this distribution) failed"
        fi
        timeout 900 "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
            -e "$ROOT[$extras]" || die "pip install failed"
        echo "$want" > "$stamp"
    fi
}
