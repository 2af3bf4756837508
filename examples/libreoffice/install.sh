#!/usr/bin/env bash
# install.sh: everything the LibreOffice example needs, on Debian 12 (or a relative).
#
#   1. LibreOffice without a GUI, and the Python-UNO bridge, from Debian (needs root; skipped
#      when the packages are already there);
#   2. a venv with unoserver in it, made from the system Python, which is the one that can
#      `import uno` (a pyenv or conda Python cannot);
#   3. tcplock itself, from this checkout, into the same venv, unless the python3 you use
#      already has it.
#
# Settings, from the environment:
#   UNO_VENV            where the venv goes (default: .venv next to this script)
#   UNOSERVER_VERSION   the unoserver release to install (default: 3.7, the one tested)
#   PYTHON              a Python that may already have tcplock (default: python3)
#
# Running it again is harmless: each step is skipped when its result is already there.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
VENV=${UNO_VENV:-$here/.venv}
UNOSERVER_VERSION=${UNOSERVER_VERSION:-3.7}
PYTHON=${PYTHON:-python3}
PACKAGES="libreoffice-core-nogui libreoffice-writer-nogui python3-uno python3-venv"

step() { echo "==> $*" >&2; }

# 1. Debian packages. --no-install-recommends keeps it to about 260 MB; nothing recommended is
# needed to turn documents into PDFs. The apt lock may be held by another install (unattended
# upgrades, another job): wait for it rather than fail.
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
        missing="$missing $p"
done
if [ -n "$missing" ]; then
    step "installing Debian packages:$missing"
    sudo=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || {
            echo "install.sh: run as root (or install sudo) to install:$missing" >&2
            exit 1
        }
        sudo="sudo"
    fi
    apt=(env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300)
    # An image without package lists (a fresh container) needs an update first; so does an
    # install that fails because the lists are stale.
    if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e '^lock$' -e '^partial$')" ]; then
        $sudo "${apt[@]}" update
    fi
    install=(install -y --no-install-recommends $missing)
    $sudo "${apt[@]}" "${install[@]}" || { $sudo "${apt[@]}" update && $sudo "${apt[@]}" "${install[@]}"; }
fi
/usr/bin/python3 -c 'import uno' || {
    echo "install.sh: /usr/bin/python3 cannot import uno (is python3-uno installed?)" >&2
    exit 1
}

# 2. The unoserver venv. --system-site-packages lets it see uno.py from python3-uno. A lock
# keeps two runs (two test sessions, say) from building the same venv at once.
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock -w 300 9
if [ "$("$VENV/bin/unoserver" --version 2>/dev/null)" = "unoserver $UNOSERVER_VERSION" ] &&
    "$VENV/bin/python" -c 'import uno' 2>/dev/null; then
    step "unoserver $UNOSERVER_VERSION is already in $VENV"
else
    step "creating $VENV with unoserver $UNOSERVER_VERSION"
    rm -rf "$VENV"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "unoserver==$UNOSERVER_VERSION"
    "$VENV/bin/python" -c 'import uno'
    "$VENV/bin/unoserver" --version
fi
exec 9>&-

# 3. tcplock. It runs on any Python 3.9+ and does not need uno. If the python3 you use already
# has it (a development checkout, CI), that one is used; otherwise it goes into the venv too,
# which also avoids Debian's "externally managed environment" refusal for the system Python.
# Each check runs from / (not from the checkout, whose own tcplock/ folder any Python would
# import) and imports the command's module, which needs every dependency of tcplock.
if (cd / && "$PYTHON" -c 'import tcplock.cli') 2>/dev/null; then
    step "tcplock is already importable by $PYTHON"
elif (cd / && "$VENV/bin/python" -c 'import tcplock.cli') 2>/dev/null; then
    step "tcplock is already in $VENV"
else
    step "installing tcplock from $repo into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$repo"
fi

step "done. Next: $here/run-stack.sh"
