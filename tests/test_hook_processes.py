"""The processes of hooks and readiness commands never outlive tcplock: not when it stops, and
not when it is killed outright (SIGKILL) while one runs, children included; what a hook that
ended leaves running on purpose is left alone."""

import os
import signal

import pytest

from conftest import connect, free_port, process_alive, recv_exactly, wait_until

pytestmark = pytest.mark.timeout(60)

#: A command that starts a child and waits, and says so (on tcplock's standard error) once it
#: has been running a while: one killed in the instant it starts, before tcplock has named it
#: to its helper, is the one case left (docs/DESIGN.md), and a loaded machine can stretch
#: that instant to milliseconds.
SETTLE = "sleep 0.3"
BUSY = f"sleep 300 & {SETTLE}; echo command-running >&2; sleep 301"


def killed_while_running(p, marked):
    """tcplock ``p`` is killed with SIGKILL while a marked command of its runs; nothing
    marked lives on."""
    running = marked.alive()
    assert p.proc.pid in running and len(running) >= 3  # tcplock, the command, its child
    p.signal(signal.SIGKILL)
    p.wait()
    wait_until(lambda: marked.alive() == [], timeout=10, what="the command's processes to die")


def test_a_hook_running_when_tcplock_is_killed_dies_with_its_children(cli, make_backend, marked):
    backend = make_backend("echo")
    p = cli.to(backend, "--on-activate", BUSY, env=marked.env)
    p.wait_ready()
    c = connect(p.port)
    try:
        p.wait_for("command-running")
        killed_while_running(p, marked)
    finally:
        c.close()


def test_a_readiness_command_running_when_tcplock_is_killed_dies_with_its_children(
    cli, marked, tmp_path
):
    flag = tmp_path / "probing"
    command = f"sleep 300 & {SETTLE}; touch {flag}; sleep 301"
    p = cli.to(free_port(), "--ready-cmd", command, env=marked.env)
    p.wait_ready()
    wait_until(flag.exists, timeout=10, what="the readiness command to run")
    killed_while_running(p, marked)


def test_a_hook_dies_with_a_killed_tcplock_even_after_its_helper_process_was_killed(
    cli, make_backend, marked, tmp_path
):
    """The helper process that sees to it (README, Hooks) is killed; the next hook has
    another."""
    busy = tmp_path / "busy"
    backend = make_backend("echo")
    p = cli.to(backend, "--on-activate", f"if [ -e {busy} ]; then {BUSY}; fi", env=marked.env)
    p.wait_ready()
    c = connect(p.port)
    c.sendall(b"x")
    assert recv_exactly(c, 1) == b"x"  # the first hook has run, and ended
    c.close()
    helpers = [pid for pid in marked.alive() if b"--reap" in command_line(pid)]
    assert len(helpers) == 1
    os.kill(helpers[0], signal.SIGKILL)
    wait_until(lambda: not process_alive(helpers[0]), what="the helper to end")
    busy.touch()
    c = connect(p.port)
    try:
        p.wait_for("command-running")
        killed_while_running(p, marked)
    finally:
        c.close()


def command_line(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def test_nothing_of_the_hooks_is_left_after_a_clean_stop(cli, make_backend, marked):
    backend = make_backend("echo")
    p = cli.to(backend, "--on-activate", "true", "--on-timeout", "true", env=marked.env)
    p.wait_ready()
    for _ in range(3):
        c = connect(p.port)
        c.sendall(b"x")
        assert recv_exactly(c, 1) == b"x"
        c.close()
    p.wait_for("end=closed")
    p.signal(signal.SIGTERM)
    assert p.wait() == 0
    wait_until(lambda: marked.alive() == [], timeout=5, what="every process to end")


def test_what_an_ended_hook_left_running_outlives_a_killed_tcplock(cli, make_backend, marked):
    backend = make_backend("echo")
    hook = "sleep 300 & echo left=$! >&2"
    p = cli.to(backend, "--on-activate", hook, env=marked.env)
    p.wait_ready()
    c = connect(p.port)
    c.sendall(b"x")
    assert recv_exactly(c, 1) == b"x"  # the hook has ended
    left = int(p.wait_for(r"left=\d+").split("left=")[1])
    p.signal(signal.SIGKILL)
    p.wait()
    c.close()
    wait_until(lambda: marked.alive() == [left], timeout=10, what="all but the left one to end")
    assert process_alive(left)
