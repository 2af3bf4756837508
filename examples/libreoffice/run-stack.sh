#!/usr/bin/env bash
# run-stack.sh: unoserver (with its LibreOffice) and tcplock in front of it, in the foreground.
#
# Clients convert through tcplock's port, never unoserver's:
#     unoconvert --host 127.0.0.1 --port 9000 --host-location remote in.odt out.pdf
#
# Ctrl-C (or SIGTERM) stops tcplock first, which lets the conversion in progress finish (up to
# DRAIN_TIMEOUT) and turns the waiting ones away; then unoserver and LibreOffice are stopped.
# A second Ctrl-C cuts the conversion in progress at once.
#
# Settings, from the environment (defaults in brackets):
#   TCPLOCK_PORT          where clients connect, on 127.0.0.1 [9000]
#   STATUS_PORT           tcplock's /status and /metrics, on 127.0.0.1; "off" for none [9100]
#   RESTART_CONVERSIONS   restart LibreOffice after this many conversions [50]
#   CONVERSION_TTL        longest a single request may take before it is cut and LibreOffice
#                         is restarted [2m]
#   DRAIN_TIMEOUT         on Ctrl-C, how long the conversion in progress may go on [30s]
#   UNO_VENV, UNO_XMLRPC_PORT [2003], UNO_PORT [2002], UNO_STATE_DIR: see unoserver-ctl
#   PYTHON                a Python that has tcplock [python3, else the venv's]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export UNO_VENV=${UNO_VENV:-$here/.venv}
export UNO_XMLRPC_PORT=${UNO_XMLRPC_PORT:-2003}
export UNO_PORT=${UNO_PORT:-2002}
ctl=$here/unoserver-ctl

TCPLOCK_PORT=${TCPLOCK_PORT:-9000}
STATUS_PORT=${STATUS_PORT:-9100}
RESTART_CONVERSIONS=${RESTART_CONVERSIONS:-50}
CONVERSION_TTL=${CONVERSION_TTL:-2m}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-30s}

if (cd / && "${PYTHON:-python3}" -c 'import tcplock') 2>/dev/null; then
    python=${PYTHON:-python3}
elif "$UNO_VENV/bin/python" -c 'import tcplock' 2>/dev/null; then
    python=$UNO_VENV/bin/python
else
    echo "run-stack.sh: tcplock is not installed; run $here/install.sh first" >&2
    exit 1
fi

args=(
    --listen "127.0.0.1:$TCPLOCK_PORT"
    --proxy-host 127.0.0.1 --proxy-port "$UNO_XMLRPC_PORT"
    # One client at a time: unoserver handles one request at a time anyway, and one idle or
    # slow connection blocks it for everyone. tcplock makes the others wait in order instead.
    --slots 1
    # Each unoconvert run is TWO connections, one after the other: info(), then convert().
    # tcplock counts connections, so restarting every 50 conversions is --restart-every 100.
    --restart-every "$((2 * RESTART_CONVERSIONS))"
    # The lifetime of ONE connection, i.e. of one conversion request. It must be longer than
    # the longest conversion you legitimately expect, or big documents get cut. When it runs
    # out, LibreOffice is hung (or working on something pathological): cut, then restart.
    --timeout "$CONVERSION_TTL"
    --restart-on-timeout
    # The restart command checks readiness itself, with a real XML-RPC call (unoping): an open
    # port is not enough, since unoserver listens before it has connected to LibreOffice.
    # tcplock's own check after it (--ready-timeout) only connects and closes at once, which
    # does unoserver no harm.
    --restart-cmd "$ctl restart"
    --ready-timeout 30s
    # A restart is about 8 s; with a stuck LibreOffice it may need a SIGKILL and a retry of
    # unoping, so give it room (unoserver-ctl bounds each of its own steps).
    --hook-timeout 2m
    --drain-timeout "$DRAIN_TIMEOUT"
)
[ "$STATUS_PORT" = off ] || args+=(--status "127.0.0.1:$STATUS_PORT")

tcplock_pid=""
stopping=0
cleanup() {
    trap - INT TERM EXIT
    if [ -n "$tcplock_pid" ] && kill -0 "$tcplock_pid" 2>/dev/null; then
        kill -TERM "$tcplock_pid" 2>/dev/null || true
        wait "$tcplock_pid" 2>/dev/null || true
    fi
    echo "run-stack.sh: stopping unoserver" >&2
    "$ctl" stop || true
}
on_signal() {
    # Before tcplock runs: just stop (the EXIT trap stops unoserver). Then: the first signal
    # lets tcplock drain, the next one makes it cut what is still active.
    [ -n "$tcplock_pid" ] || exit 130
    stopping=$((stopping + 1))
    kill -TERM "$tcplock_pid" 2>/dev/null || true
}
trap cleanup EXIT
trap on_signal INT TERM

"$ctl" start
"$ctl" ready

# Job control on: tcplock gets a process group of its own, so a Ctrl-C reaches only this script,
# which passes exactly one SIGTERM on (two would cut the conversion in progress at once).
set -m
"$python" -m tcplock "${args[@]}" &
tcplock_pid=$!
set +m

# `wait` returns early whenever a signal arrives; wait again until tcplock has really ended.
while kill -0 "$tcplock_pid" 2>/dev/null; do
    wait "$tcplock_pid" || true
done
status=0
wait "$tcplock_pid" || status=$?
exit "$status"
