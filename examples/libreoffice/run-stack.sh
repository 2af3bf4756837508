#!/usr/bin/env bash
# run-stack.sh: the LibreOffice farm, in the foreground: ONE tcplock command that runs
# UNOSERVERS unoservers (each with its LibreOffice) as its backends, and lets one client at a
# time through to each of them, plus SPARES more kept ready as standbys, that take the place of
# one that restarts.
#
# Clients convert through tcplock's port, never a unoserver's:
#     unoconvert --host 127.0.0.1 --port 9000 --host-location remote in.odt out.pdf
#
# This script only builds the command line from the settings below, prints it, and becomes
# tcplock (exec). So tcplock gets every signal itself: SIGTERM or SIGINT (Ctrl-C) stop it, even
# when this script was started with SIGINT ignored (`run-stack.sh &` in another script): it lets
# the conversions in progress finish (up to DRAIN_TIMEOUT), turns the waiting ones away, stops
# every unoserver and LibreOffice, and exits once they are gone. A second signal cuts the
# conversions in progress at once.
#
# Settings, from the environment (defaults in brackets):
#   LISTEN_PORT           where clients connect, on 127.0.0.1 [9000]
#   STATUS_PORT           tcplock's /status and /metrics, on 127.0.0.1; "off" for none [9100]
#   UNOSERVERS            how many unoservers take clients (one per CPU core is the advice) [2]
#   SPARES                how many more are kept started and ready as standbys: a restart
#                         then costs no client any wait; each costs a LibreOffice's memory
#                         (about 120 MB while it waits) [1]
#   FIRST_PORT            the first unoserver's port; the others follow it [2003]
#   RESTART_CONVERSIONS   restart a LibreOffice after this many conversions [50]
#   CONVERSION_TTL        longest a single request may take before it is cut and that
#                         LibreOffice is restarted [2m]
#   MAX_RSS               restart a LibreOffice, between two clients, once its processes use
#                         more memory than this ("off" for no limit) [1G]
#   DRAIN_TIMEOUT         on stop, how long the conversions in progress may go on [30s]
#   UNO_VENV              the venv with unoserver [.venv next to this script]
#   UNO_PORT_OFFSET, UNO_STATE_DIR: see unoserver-backend
#   PYTHON                a Python that has tcplock [python3, else the venv's]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export UNO_VENV=${UNO_VENV:-$here/.venv}
LISTEN_PORT=${LISTEN_PORT:-9000}
STATUS_PORT=${STATUS_PORT:-9100}
UNOSERVERS=${UNOSERVERS:-2}
SPARES=${SPARES:-1}
FIRST_PORT=${FIRST_PORT:-2003}
RESTART_CONVERSIONS=${RESTART_CONVERSIONS:-50}
CONVERSION_TTL=${CONVERSION_TTL:-2m}
MAX_RSS=${MAX_RSS:-1G}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-30s}

# As in install.sh: from /, so that the checkout's own tcplock/ folder does not count.
if (cd / && "${PYTHON:-python3}" -c 'import tcplock.cli') 2>/dev/null; then
    python=${PYTHON:-python3}
elif (cd / && "$UNO_VENV/bin/python" -c 'import tcplock.cli') 2>/dev/null; then
    python=$UNO_VENV/bin/python
else
    echo "run-stack.sh: tcplock is not installed; run $here/install.sh first" >&2
    exit 1
fi
[ -x "$UNO_VENV/bin/unoserver" ] || {
    echo "run-stack.sh: no unoserver in $UNO_VENV; run $here/install.sh first (or set UNO_VENV)" >&2
    exit 1
}
[[ $UNOSERVERS =~ ^[1-9][0-9]*$ ]] || {
    echo "run-stack.sh: UNOSERVERS must be a whole number from 1 up, not '$UNOSERVERS'" >&2
    exit 2
}
[[ $SPARES =~ ^[0-9]+$ ]] || {
    echo "run-stack.sh: SPARES must be a whole number from 0 up, not '$SPARES'" >&2
    exit 2
}

args=(--listen "127.0.0.1:$LISTEN_PORT")
for ((i = 0; i < UNOSERVERS + SPARES; i++)); do
    args+=(--backend "127.0.0.1:$((FIRST_PORT + i))")
done
args+=(
    # One client at a time per unoserver: it handles one request at a time anyway, and one idle
    # or slow connection blocks it for everyone. tcplock makes the others wait in order instead,
    # and gives each waiting client the first unoserver that is free.
    --slots 1
    # tcplock runs each unoserver itself, with that backend's address in its environment, and
    # starts it again when it ends or has to be restarted.
    --backend-cmd "exec $(printf '%q' "$here/unoserver-backend")"
    # Ready means answering a real XML-RPC call: unoserver listens before it has connected to
    # LibreOffice. unoping calls info(), which unoserver answers only once it is connected.
    # unoping is a Python program (about 60 ms of CPU a run, and tcplock asks every 0.5 s): a
    # connect from bash first skips it while unoserver does not listen yet (its first 5 s).
    --ready-cmd "bash -c 'exec 3<>/dev/tcp/\$TCPLOCK_BACKEND_HOST/\$TCPLOCK_BACKEND_PORT' 2>/dev/null && timeout 10 $(printf '%q' "$UNO_VENV/bin/unoping") --host \"\$TCPLOCK_BACKEND_HOST\" --port \"\$TCPLOCK_BACKEND_PORT\""
    # A start is about 6 s (unoserver waits 5 s before it listens); allow for a slow machine.
    --ready-timeout 60s
    # Each unoconvert run is TWO connections, one after the other: info(), then convert().
    # tcplock counts connections, per backend: restarting every 50 conversions is 100.
    --restart-every "$((2 * RESTART_CONVERSIONS))"
    # The lifetime of ONE connection, i.e. of one request. It must be longer than the longest
    # conversion you legitimately expect. When it runs out, that LibreOffice is hung (or busy
    # with something pathological): the request is cut and its LibreOffice restarted.
    --timeout "$CONVERSION_TTL"
    --restart-on-timeout
    --restart-above-rss "$MAX_RSS"
    # unoserver and soffice.bin exit about half a second after SIGTERM (run-soffice sees to
    # it). One that does not is stuck, and every restart would wait for it: it is killed after
    # 1 s. Killing costs nothing here, since unoserver-backend empties its state at every start.
    --stop-timeout 1s
    --drain-timeout "$DRAIN_TIMEOUT"
    # The last SPARES unoservers to be ready are standbys: when one in service has to restart,
    # a standby takes its place at once, and the restarted one becomes the standby.
    --spares "$SPARES"
)
[ "$STATUS_PORT" = off ] || args+=(--status "127.0.0.1:$STATUS_PORT")

echo "run-stack.sh: $python -m tcplock ${args[*]@Q}" >&2
exec "$python" -m tcplock "${args[@]}"
