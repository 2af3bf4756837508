"""Every command in every README, found as written, and what runs it.

A README's commands are the lines of its ```sh blocks: a line ending in a backslash goes on with
the next, a ``for`` loop up to its ``done`` is one command, and comment lines are not commands.
:data:`RUN_BY` names, for each command (by how it starts), the test that runs it as written, or
why none does; ``tests/test_docs.py`` checks that every command has exactly one entry, and that
each test named exists. The tests take each command from its README (:func:`command`), never from
a copy, and run it with ``bash -c`` from the folder the README says, in a fresh copy of the
checkout made by the quick start (the ``readme_clone`` fixture of conftest.py).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
from pathlib import Path

from gevent import subprocess

from conftest import ChildProcess

ROOT = Path(__file__).resolve().parent.parent

# Fixed ports, as the READMEs write them: a test that finds one taken fails and says so.
RUN_BY = {
    "README.md": [
        (
            "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/tcplock --demo",
            "test_docs.py::test_quick_start_as_written",
        ),
        (
            "python3 -m venv .venv && .venv/bin/pip install -e '.[test]'",
            "not run by a test (it is the test suite): .ci/run runs it as written, and "
            "test_docs.py::test_ci_runs_the_readme_test_command checks that it does",
        ),
        (
            "tcplock --listen 9000 --proxy-port 2003",
            "test_docs.py::test_readme_commands_as_written",
        ),
        ("curl -s localhost:9100/status", "test_docs.py::test_readme_commands_as_written"),
        ("curl -s -X POST localhost:9100/pause", "test_docs.py::test_readme_commands_as_written"),
        (
            "curl -s -X POST localhost:9100/backends/127.0.0.1:2004/drain",
            "test_docs.py::test_readme_commands_as_written",
        ),
        (
            'curl -s -H "Authorization: Bearer $(cat /etc/tcplock/status-token)"',
            "test_contrib.py::test_prometheus_readme_as_written (with /etc/ in a temporary "
            "directory: writing /etc needs root and changes the machine)",
        ),
        (
            "TCPLOCK_SLOTS=2 tcplock --check-config -c contrib/tcplock.conf",
            "test_check_config.py::test_the_readme_check_config_command_as_written",
        ),
        (
            "tcplock -l 9000 -p 2003 -t 2m --restart-cmd",
            "test_docs.py::test_readme_commands_as_written",
        ),
        (
            "tcplock -l 9000 --backend 127.0.0.1:2003 --backend 127.0.0.1:2004 --backend",
            "test_docs.py::test_readme_commands_as_written",
        ),
        (
            "tcplock -l 9000 --backend 127.0.0.1:2003 --backend 127.0.0.1:2004 -t 2m",
            "not run as written: it needs unoserver and unoping on PATH; "
            "test_libreoffice.py runs the same command, through examples/libreoffice/run-stack.sh",
        ),
    ],
    "examples/README.md": [
        (
            ".venv/bin/python examples/embed_gevent.py",
            "test_examples.py::test_readme_command_as_written",
        ),
    ],
    "examples/libreoffice/README.md": [
        ("examples/libreoffice/install.sh", "test_examples.py::test_libreoffice_readme_as_written"),
        (
            "examples/libreoffice/run-stack.sh",
            "test_examples.py::test_libreoffice_readme_as_written",
        ),
        (
            "python3 -m tcplock --listen 127.0.0.1:9000",
            "not run as written: it is what run-stack.sh prints and runs (with absolute paths), "
            "and test_examples.py::test_libreoffice_readme_as_written checks that it prints this",
        ),
        (
            "printf 'Hello from behind tcplock\\n' > hello.txt",
            "test_examples.py::test_libreoffice_readme_as_written",
        ),
        (
            "examples/libreoffice/.venv/bin/unoconvert --host 127.0.0.1 --port 9000",
            "test_examples.py::test_libreoffice_readme_as_written",
        ),
        ("kill -KILL $(pgrep", "test_examples.py::test_libreoffice_readme_as_written"),
        (
            "CONVERSION_TTL=10s examples/libreoffice/run-stack.sh",
            "not run as written: test_libreoffice.py runs run-stack.sh with CONVERSION_TTL=10s "
            "on ports of its own",
        ),
        (
            "kill -STOP $(pgrep",
            "not run as written: test_libreoffice.py freezes a LibreOffice of its own farm",
        ),
        (
            "for i in 1 2 3 4; do",
            "not run as written: test_libreoffice.py sends conversions to a frozen farm",
        ),
    ],
    "contrib/gunicorn/README.md": [
        (".venv/bin/pip install gunicorn", "test_contrib.py::test_gunicorn_readme_as_written"),
        ("cd contrib/gunicorn", "test_contrib.py::test_gunicorn_readme_as_written"),
        (
            "APP_BACKEND=127.0.0.1:2003 APP_LOCK_PORT=9000",
            "test_contrib.py::test_gunicorn_readme_as_written",
        ),
        (
            "APP_LOCK_PORT=9000 .venv/bin/python -m gunicorn -k gevent -w 4 --chdir",
            "test_contrib.py::test_gunicorn_readme_as_written",
        ),
    ],
    "contrib/prometheus/README.md": [
        (
            "mkdir -p /etc/tcplock",
            "test_contrib.py::test_prometheus_readme_as_written (/etc/ "
            "in a temporary directory, here and below)",
        ),
        ("head -c 32 /dev/urandom", "test_contrib.py::test_prometheus_readme_as_written"),
        (
            "chmod 600 /etc/tcplock/status-token",
            "test_contrib.py::test_prometheus_readme_as_written",
        ),
        (
            ".venv/bin/tcplock -l 9000 -p 2003 --status 9100 --status-token-file",
            "test_contrib.py::test_prometheus_readme_as_written",
        ),
        ("install -m 600 -o prometheus", "test_contrib.py::test_prometheus_readme_as_written"),
        (
            "promtool check config contrib/prometheus/prometheus.yml",
            "test_contrib.py::test_prometheus_readme_as_written",
        ),
        (
            'curl -s -H "Authorization: Bearer $(cat /etc/tcplock/status-token)"',
            "test_contrib.py::test_prometheus_readme_as_written",
        ),
    ],
    "contrib/haproxy/README.md": [
        ("mkdir -p /run/haproxy", "test_contrib.py::test_haproxy_readme_as_written"),
        (
            "tcplock --demo --accept-proxy --listen 9001",
            "test_contrib.py::test_haproxy_readme_as_written",
        ),
        (
            "tcplock --demo --accept-proxy --listen 9002",
            "test_contrib.py::test_haproxy_readme_as_written",
        ),
        (
            "haproxy -f contrib/haproxy/haproxy.cfg -db",
            "test_contrib.py::test_haproxy_readme_as_written",
        ),
        (
            "tcplock --listen 10.0.0.11:9000",
            "not run: it needs the address 10.0.0.11 on this machine; test_haproxy.py runs "
            "--accept-proxy with --trusted-proxy on loopback",
        ),
        ("curl -s -X POST 127.0.0.1:9201/pause", "test_contrib.py::test_haproxy_readme_as_written"),
        (
            "curl -s -X POST 127.0.0.1:9201/resume",
            "test_contrib.py::test_haproxy_readme_as_written",
        ),
        (
            "curl -s -X POST 127.0.0.1:9201/backends/127.0.0.1:2004/drain",
            "not run as written: the demo instances have no backend 127.0.0.1:2004; "
            "test_docs.py::test_readme_commands_as_written runs the same request on a pool",
        ),
        (
            "curl -s -X POST 127.0.0.1:9201/backends/127.0.0.1:2004/enable",
            "not run as written: as the drain above; test_status.py enables a drained backend",
        ),
        (
            'echo "disable agent tcplock/a"',
            "not run: it needs HAProxy's runtime socket in /run/haproxy (HAProxy as a system "
            "service, root); test_haproxy.py drives the same commands on a socket of its own",
        ),
        ('echo "set server tcplock/a state drain"', "not run: as the line above"),
        ("curl -s 127.0.0.1:9201/status", "test_contrib.py::test_haproxy_readme_as_written"),
        ("nc 127.0.0.1 9101", "test_contrib.py::test_haproxy_readme_as_written"),
        ('curl -s "http://127.0.0.1:8404/;csv"', "test_contrib.py::test_haproxy_readme_as_written"),
    ],
    "contrib/systemd/README.md": [
        (
            "python3 -m venv /opt/tcplock",
            "test_contrib.py::test_systemd_analyze_verify_after_the_readme_install (with /opt/ "
            "in a temporary directory)",
        ),
        (
            "/opt/tcplock/bin/pip install .",
            "test_contrib.py::test_systemd_analyze_verify_after_the_readme_install (as above)",
        ),
        ("cp contrib/tcplock.conf /etc/tcplock.conf", "not run: writes /etc (root)"),
        ("cp contrib/systemd/tcplock.service", "not run: installs a unit (root, a real systemd)"),
        ("systemctl daemon-reload", "not run: a real systemd"),
        (
            "systemctl enable --now tcplock",
            "not run: a real systemd (test_contrib.py runs the "
            "unit's ExecStart with its notify socket, and systemd-analyze verify on the unit)",
        ),
        ("journalctl -u tcplock -f", "not run: a real systemd"),
        ("useradd --system", "not run: adds a user to the machine (root)"),
        ("systemctl edit tcplock", "not run: a real systemd"),
    ],
    "bench/README.md": [
        (
            "bash bench/run            #",
            "not run: a full benchmark run (about 8 minutes); .ci/run runs its --smoke form",
        ),
        (
            "bash bench/run --smoke",
            "not run by a test: .ci/run runs it, with PYTHON=.venv/bin/python (its venv's Python)",
        ),
        ("bash bench/run --help", "test_docs.py::test_bench_help_as_written"),
        (
            "bash bench/run --compare c898c49",
            "not run: a benchmark run of minutes against an older commit",
        ),
        (
            "bash bench/run --compare HEAD~1",
            "not run: a benchmark run of about a minute against the previous commit",
        ),
        ("bash bench/run libreoffice", "not run: LibreOffice benchmarks of minutes"),
    ],
}


def readmes() -> list[str]:
    """Every README.md of the checkout, relative to its top (not those inside venvs)."""
    found = []
    for path in ROOT.rglob("README.md"):
        parts = path.relative_to(ROOT).parts
        if not any(p.startswith(".") or p in ("build", "node_modules") for p in parts):
            found.append("/".join(parts))
    return sorted(found)


def commands(readme: str) -> list[str]:
    """The commands of a README's ```sh blocks, as written."""
    text = (ROOT / readme).read_text()
    found = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S):
        pending = ""
        for line in block.splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            pending += line + "\n"
            if line.endswith("\\"):
                continue
            if pending.startswith("for ") and not line.lstrip().startswith("done"):
                continue
            found.append(pending.rstrip("\n"))
            pending = ""
    return found


def runner(readme: str, cmd: str) -> list[str]:
    """The RUN_BY entries that match a command."""
    return [how for start, how in RUN_BY.get(readme, []) if cmd.startswith(start)]


def command(readme: str, start: str) -> str:
    """The one command of ``readme`` that starts with ``start``."""
    found = [c for c in commands(readme) if c.startswith(start)]
    assert len(found) == 1, f"{readme}: {len(found)} commands start with {start!r}: {found}"
    return found[0]


def ensure_free(*ports: int) -> None:
    """The READMEs' fixed ports must be free on loopback before their commands run."""
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError as e:
                raise AssertionError(f"port {port}, which the README uses, is taken: {e}") from e


def activated(clone: Path) -> dict:
    """The environment of a shell that has activated the clone's venv, as the quick start
    says to for a bare ``tcplock``."""
    venv = clone / ".venv"
    return {"VIRTUAL_ENV": str(venv), "PATH": f"{venv}/bin:{os.environ['PATH']}"}


class Shell(ChildProcess):
    """``bash -c COMMAND`` in a session of its own (stdout joined to stderr, which is read
    line by line); :meth:`stop` signals the whole session, as Ctrl-C in a terminal would."""

    clean_prefixes = ("TCPLOCK_", "APP_", "VIRTUAL_ENV", "PYTHONPATH")

    def __init__(self, cmd, cwd, env=None):
        super().__init__(
            ["bash", "-c", f"exec 1>&2; {cmd}"], env=env, cwd=cwd, preexec_fn=os.setsid
        )

    def stop(self, sig=signal.SIGINT, timeout=30):
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        return self.wait(timeout=timeout)

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        super().kill()


def run(cmd: str, cwd: Path, env=None, timeout=300) -> subprocess.CompletedProcess:
    """A command that finishes, run by bash in ``cwd``; its output, and a failure if it fails."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(Shell.clean_prefixes)}
    full.update(env or {})
    done = subprocess.run(
        ["bash", "-c", cmd],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"{cmd}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def copy_checkout(dest: Path) -> Path:
    """A fresh clone of the checkout as it is now (its tracked and new files, as a commit of the
    working tree would have them), without what is ignored (venvs, caches)."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest
