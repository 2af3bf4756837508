"""``tcplock --check-config``, run for real: the settings read as a start reads them, checked as
a start checks them, printed with where each came from; exit 0, or 2 with the error in one line.
Nothing is bound and no backend is started."""

import os
import re
import socket
import subprocess
import sysconfig
from pathlib import Path

import pytest

from conftest import LOOPBACK, run_cli

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def setting_lines(out):
    """The settings that were given (the lines not commented out), as {name: (value, source)}."""
    found = {}
    for line in out.splitlines():
        if line and not line.startswith("#"):
            setting, source = line.split("  # ", 1)
            name, value = setting.split(" = ", 1)
            found[name] = (value, source)
    return found


def check(*args, env=None):
    status, out, err = run_cli("--check-config", *args, env=env)
    assert "Traceback" not in err, err
    return status, out, err


def test_good_settings_are_printed_with_where_each_came_from(tmp_path):
    conf = tmp_path / "tcplock.conf"
    conf.write_text(
        "# a comment\nlisten = 127.0.0.1:9000\n\ntimeout = 1m30s\nallow = [10.0.0.0/8]\n"
    )
    env = {"TCPLOCK_SLOTS": "2", "TCPLOCK_TIMOUT": "5s", "TCPLOCK_QUEUE_TIMEOUT": "500ms"}
    status, out, err = check(
        "-c", str(conf), "-p", "db.local:2003", "--hook-timeout", "2h", env=env
    )
    assert status == 0, err
    assert setting_lines(out) == {
        "listen": ("127.0.0.1:9000", f"{conf}, line 2"),
        "timeout": ("1m30s", f"{conf}, line 4"),
        "allow": ("[10.0.0.0/8]", f"{conf}, line 5"),
        "slots": ("2", "TCPLOCK_SLOTS"),
        "queue-timeout": ("0.5s", "TCPLOCK_QUEUE_TIMEOUT"),
        "proxy-port": ("2003", "-p/--proxy-port"),
        "proxy-host": ("db.local", "from -p/--proxy-port"),
        "hook-timeout": ("2h", "--hook-timeout"),
    }
    lines = out.splitlines()
    assert f"# config file: {conf}  # -c/--config" in lines
    assert "# connect-timeout = 5s  # default" in lines
    assert "# log-level = info  # default" in lines
    max_queue = next(line for line in lines if line.startswith("# max-queue = "))
    assert re.fullmatch(
        r"# max-queue = \d+  # default: as many as the descriptor limit leaves room for", max_queue
    )
    # An unknown variable is warned about, as at a start, and does not fail the check.
    assert err.splitlines() == [
        "tcplock: warning: TCPLOCK_TIMOUT is not a tcplock setting; ignored "
        "(did you mean 'TCPLOCK_TIMEOUT'?)"
    ]


def test_a_config_file_named_by_the_environment_is_read_and_named(tmp_path):
    conf = tmp_path / "tcplock.conf"
    conf.write_text("listen = 9000\nbackend = [127.0.0.1:2003]\n")
    status, out, err = check(env={"TCPLOCK_CONFIG": str(conf)})
    assert status == 0, err
    assert f"# config file: {conf}  # TCPLOCK_CONFIG" in out.splitlines()
    assert setting_lines(out) == {
        "listen": ("127.0.0.1:9000", f"{conf}, line 1"),
        "backend": ("[127.0.0.1:2003]", f"{conf}, line 2"),
    }
    assert "# proxy-host = localhost  # default" in out.splitlines()


def test_what_it_prints_is_a_config_file_giving_the_same_settings(tmp_path):
    conf = tmp_path / "tcplock.conf"
    conf.write_text("listen = [::1]:9000\nrestart-above-rss = 1536M\n")
    status, out, err = check(
        "-c", str(conf),
        "--backend", "127.0.0.1:2003", "--backend", "[::1]:2004",
        "--backend-cmd", "exec unoserver --port $TCPLOCK_BACKEND_PORT # the farm",
        "--on-activate", "'quoted' at the start",
        "--restart-on-timeout", "--trusted-proxy", "::1", "--drain-timeout", "0",
        "--log-format", "JSON",
        env={"TCPLOCK_TIMEOUT": "1d2h3m4.5s", "TCPLOCK_STATUS": "0", "TCPLOCK_ACCEPT_PROXY": "yes"},
    )  # fmt: skip
    assert status == 0, err
    first = setting_lines(out)
    assert first["backend-cmd"][0] == "'exec unoserver --port $TCPLOCK_BACKEND_PORT # the farm'"
    assert first["timeout"][0] == "1d2h3m4.5s" and first["restart-above-rss"][0] == "1536M"
    saved = tmp_path / "saved.conf"
    saved.write_text(out)
    status, again, err = check("-c", str(saved))
    assert status == 0, err
    second = setting_lines(again)
    assert {n: v for n, (v, _) in second.items()} == {n: v for n, (v, _) in first.items()}
    assert all(source.startswith(f"{saved}, line ") for _, source in second.values())


def test_it_binds_no_port_and_starts_no_backend(tmp_path):
    taken = socket.socket()
    taken.bind((LOOPBACK, 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    started = tmp_path / "started"
    try:
        status, out, err = check(
            "-l", f"{LOOPBACK}:{port}", "--status", f"{LOOPBACK}:{port}",
            "--backend", "127.0.0.1:2003", "--backend-cmd", f"touch {started}; sleep 60",
        )  # fmt: skip
        assert status == 0, err
        # A start would fail to bind it (exit 1).
        assert run_cli("-l", f"{LOOPBACK}:{port}", "-p", "1")[0] == 1
    finally:
        taken.close()
    assert not started.exists()
    status, out, err = check("--demo")
    assert status == 0, err
    assert setting_lines(out)["listen"] == ("127.0.0.1:9000", "from --demo")


def hooks_file(tmp_path, text):
    path = tmp_path / "hooks.py"
    path.write_text(text)
    return str(path)


def conf_file(tmp_path, text):
    path = tmp_path / "tcplock.conf"
    path.write_text(text)
    return str(path)


def token_file(tmp_path, mode):
    path = tmp_path / "token"
    path.write_text("s3cret\n")
    path.chmod(mode)
    return str(path)


ERRORS = [
    # A value, named where it was written.
    (
        lambda t: (["-l", "9000", "-p", "1", "-n", "0"], {}),
        r"argument -n/--slots: must be at least 1",
    ),
    (
        lambda t: (["-l", "9000", "-p", "1"], {"TCPLOCK_TIMEOUT": "soon"}),
        r"TCPLOCK_TIMEOUT: invalid",
    ),
    (
        lambda t: (["-c", conf_file(t, "listen = 9000\nproxy-port = 1\nslots = x\n")], {}),
        r"tcplock\.conf, line 3: slots: invalid number 'x'",
    ),
    (
        lambda t: (["-l", "9000", "--proxy-host", "h:1", "-p", "1"], {}),
        r"argument --proxy-host: 'h:1' has a port",
    ),
    (lambda t: (["-l", "9000", "-p", "1", "--timout", "5s"], {}), r"did you mean '--timeout'\?"),
    # The rules between settings.
    (lambda t: (["-l", "9000"], {}), r"the following arguments are required: -p/--proxy-port"),
    (
        lambda t: (["-l", "9000", "-p", "1", "--restart-every", "5"], {}),
        r"--restart-every needs --backend-cmd or --restart-cmd",
    ),
    (
        lambda t: (["-l", "9000", "--backend", "h:1", "--backend", "h:1"], {}),
        r"--backend: h:1 is given twice",
    ),
    # The hooks file, run as a start runs it.
    (
        lambda t: (["-l", "9000", "-p", "1", "--hooks", hooks_file(t, "def on_activate(:\n")], {}),
        r"--hooks: .*hooks\.py, line 1: ",
    ),
    (
        lambda t: (["-l", "9000", "-p", "1"], {"TCPLOCK_HOOKS": hooks_file(t, "x = 1\n")}),
        r"TCPLOCK_HOOKS: .*hooks\.py defines none of on_activate, on_timeout, restart",
    ),
    # The status token file.
    (
        lambda t: (
            ["-l", "9000", "-p", "1", "--status", "0", "--status-token-file", token_file(t, 0o644)],
            {},
        ),
        r"--status-token-file: .*token is open to group or others",
    ),
]


@pytest.mark.parametrize("make, message", ERRORS)
def test_each_kind_of_error_is_one_line_and_exit_2(tmp_path, make, message):
    args, env = make(tmp_path)
    status, out, err = check(*args, env=env)
    assert status == 2, (out, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tcplock: error: "), err
    assert re.search(message, lines[0]), lines[0]


def test_the_readme_check_config_command_as_written():
    section = README.read_text().split("\n### Checking a configuration\n", 1)[1]
    command, shown = re.findall(r"```(?:sh)?\n(.*?)```", section, re.S)[:2]
    assert command.startswith("TCPLOCK_SLOTS=2 tcplock --check-config"), command
    # tcplock as pip installs it, first on PATH, as the README's install steps put it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCPLOCK_")}
    env["PATH"] = sysconfig.get_path("scripts") + os.pathsep + env.get("PATH", "")
    done = subprocess.run(
        command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for line in shown.splitlines():
        assert line in lines, f"README shows {line!r}; the command printed:\n{done.stdout}"
