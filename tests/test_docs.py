"""The README's settings table and contrib/tcplock.conf are printed from the settings table and
checked here in full (every column, defaults and help included), and the parser is checked
against the same table, so that the documentation cannot drift from the code."""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import readme_commands as rc

from conftest import connect, http, recv_all, wait_until
from tcplock import __version__
from tcplock.cli import build_parser, parse_args
from tcplock.settings import SETTINGS, grouped, render_conf, render_markdown
from tcplock.status import StatusServer, agent_reply

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CONF = ROOT / "contrib" / "tcplock.conf"


def readme_settings_section() -> str:
    return README.read_text().split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]


def readme_table() -> str:
    """The tables of settings, one per group, that end the README's settings section."""
    return (
        "### General\n" + readme_settings_section().split("\n### General\n", 1)[1].rstrip() + "\n"
    )


def test_readme_settings_table_is_the_one_printed_from_the_settings():
    assert readme_table() == render_markdown(), (
        "README settings tables are out of date; replace them with the output of "
        "'python -m tcplock.settings --markdown'"
    )


def test_sample_config_is_the_one_printed_from_the_settings():
    assert CONF.read_text() == render_conf(), (
        "contrib/tcplock.conf is out of date; regenerate it with "
        "'python -m tcplock.settings --conf > contrib/tcplock.conf'"
    )


@pytest.mark.parametrize("what, path", [("--markdown", None), ("--conf", CONF)])
def test_the_docs_are_printed_by_the_settings_module(what, path):
    out = subprocess.run(
        [sys.executable, "-m", "tcplock.settings", what],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert out == (readme_table() if path is None else path.read_text())


def test_the_parser_has_one_option_per_setting_and_what_is_not_given_is_the_default():
    actions = {a.dest: a for a in build_parser()._actions if a.dest not in ("help", "version")}
    assert sorted(actions) == sorted(["check_config"] + [s.dest for s in SETTINGS])
    for setting in SETTINGS:
        action = actions[setting.dest]
        assert tuple(action.option_strings) == setting.flags
        assert action.metavar == (None if setting.action == "store_true" else setting.metavar)
    # What is not given anywhere is the table's default.
    args = parse_args(["-l", "9000", "-p", "1"], env={})
    for setting in SETTINGS:
        if setting.name not in ("config", "listen", "proxy-port"):
            assert getattr(args, setting.dest) == setting.default, setting.name


def help_text() -> str:
    return subprocess.run(
        [sys.executable, "-m", "tcplock", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={**os.environ, "COLUMNS": "100"},
    ).stdout


def test_help_shows_every_setting_with_its_default_and_variable():
    words = " ".join(help_text().split())
    for setting in SETTINGS:
        text = f"{setting.help_text} [env var: {setting.env}]"
        assert " ".join(text.split()) in words, setting.name


def test_help_gives_the_settings_in_the_groups_of_the_readme():
    # Each group's heading, then its options, in the README's order; no option twice.
    out = help_text()
    headings = [line[:-1] for line in out.splitlines() if line.endswith(":") and line[:1] != " "]
    assert headings == [g for g, _ in grouped()]
    sections = out.split("\n\n")
    for group, settings in grouped():
        section = next(s for s in sections if s.startswith(group + ":\n"))
        options = re.findall(r"^  (-[-\w]+)", section, re.M)
        extra = ["-h", "--version", "--check-config"] if group == "general" else []
        assert options == extra + [s.flags[0] for s in settings], group
        readme = readme_table().split(f"### {group[:1].upper()}{group[1:]}\n", 1)[1]
        rows = re.findall(r"^\| `(-[-\w]+)`", readme.split("\n### ", 1)[0], re.M)
        assert rows == [s.flags[0] for s in settings], group


def test_every_setting_is_in_one_group():
    assert sorted(s.name for _, settings in grouped() for s in settings) == sorted(
        s.name for s in SETTINGS
    )


def test_sample_config_sets_the_required_settings_and_every_value_parses(tmp_path):
    text = CONF.read_text()
    set_keys = re.findall(r"^([a-z][a-z0-9-]*)\s*=", text, re.M)
    assert sorted(set_keys) == sorted(s.name for s in SETTINGS if s.required)
    # Uncommented, every sample value is accepted by the parser: the pool's backends in place
    # of the single backend's host and port, which cannot be given with them; and backends
    # that tcplock runs (with their memory limit) in place of the restart command.
    supervised = r"(backend|backend-cmd|restart-above-rss)\b"
    single = re.sub(rf"^#\s*((?!{supervised})[a-z][a-z0-9-]*\s*=)", r"\1", text, flags=re.M)
    pool = re.sub(r"^(proxy-host|proxy-port|restart-cmd)\s*=.*$", "", single, flags=re.M)
    pool = re.sub(rf"^#\s*({supervised}\s*=)", r"\1", pool, flags=re.M)
    left_out_single = ("backend", "backend-cmd", "restart-above-rss")
    for variant, left_out in ((single, left_out_single), (pool, ("proxy-port", "restart-cmd"))):
        path = tmp_path / "sample.conf"
        path.write_text(variant)
        args = parse_args(["-c", str(path)], env={})
        assert isinstance(args, argparse.Namespace)
        for setting in SETTINGS:
            if setting.example is not None and setting.name not in ("config", *left_out):
                assert getattr(args, setting.dest) not in (None, False), setting.name
    assert args.backend == [("127.0.0.1", 2003), ("127.0.0.1", 2004)]


# --- the docs agree with the code ----------------------------------------------------------

HAPROXY = ROOT / "contrib" / "haproxy"
AGENT_FORMULA = re.compile(r"slots / \(slots \+ [a-z +]+\)")


def test_the_agent_weight_formula_is_the_same_everywhere_and_the_one_the_agent_uses(
    make_backend, make_lock
):
    """The README, contrib/haproxy's README and its haproxy.cfg state one formula for the
    agent's weight; the agent's replies, with slots busy and clients waiting, are that formula."""
    texts = {
        "README.md": README.read_text(),
        "contrib/haproxy/README.md": (HAPROXY / "README.md").read_text(),
        "contrib/haproxy/haproxy.cfg": (HAPROXY / "haproxy.cfg").read_text(),
    }
    found = {
        name: set(AGENT_FORMULA.findall(" ".join(text.replace("#", " ").split())))
        for name, text in texts.items()
    }
    formulas = set().union(*found.values())
    assert len(formulas) == 1 and all(found.values()), found
    (formula,) = formulas

    def weight(slots, active, queued):
        value = eval(formula, {}, {"slots": slots, "active": active, "queued": queued})
        return f"up ready {max(1, int(value * 100 + 1e-9))}%\n"

    backend = make_backend("hold")
    lock = make_lock(backend, slots=2)
    assert agent_reply(lock) == weight(2, 0, 0) == "up ready 100%\n"
    clients = [connect(lock.server_port) for _ in range(2)]
    wait_until(lambda: backend.current == 2, what="2 active")
    assert agent_reply(lock) == weight(2, 2, 0) == "up ready 50%\n"
    clients += [connect(lock.server_port) for _ in range(3)]
    wait_until(lambda: lock.queued == 3, what="3 queued")
    assert agent_reply(lock) == weight(2, 2, 3) == "up ready 28%\n"
    backend.release_all()
    for c in clients:
        c.close()


def test_the_status_ports_404_lists_every_path_it_answers(make_backend, make_lock):
    """The 404 body lists the paths there are: those the README's status section names, each
    of which is answered (not with a 404)."""
    backend = make_backend("echo")
    lock = make_lock(backend)
    label = lock.backends[0].label
    server = StatusServer(("127.0.0.1", 0), lock)
    server.start()
    try:
        code, _, body = http(server.server_port, "GET", "/no/such/path")
        assert code == 404
        paths = json.loads(body)["paths"]
        section = README.read_text().split("\n### Status, metrics, pause and resume\n", 1)[1]
        section = section.split("\n### ")[0]
        documented = set(re.findall(r"`(?:GET|POST)\s+(/[^`\s]*)`", section))
        assert sorted(documented) == paths
        for path in paths:
            real = path.replace("HOST:PORT", label)
            answers = {m: http(server.server_port, m, real)[0] for m in ("GET", "POST")}
            assert 404 not in answers.values(), (path, answers)
    finally:
        server.stop(timeout=0)


# --- every command in every README, as written -----------------------------------------------


def test_every_readme_command_is_run_by_a_test_or_named_as_an_exception():
    """Each command of each README has one entry in readme_commands.RUN_BY: the test that runs
    it as written (which must exist), or why none does."""
    assert set(rc.readmes()) == set(rc.RUN_BY), "a README is missing from RUN_BY, or gone"
    tests = {}
    for path in ROOT.glob("tests/test_*.py"):
        tests[path.name] = set(re.findall(r"^def (test_\w+)", path.read_text(), re.M))
    for readme in rc.readmes():
        for cmd in rc.commands(readme):
            hows = rc.runner(readme, cmd)
            assert len(hows) == 1, f"{readme}: {cmd!r} has {len(hows)} entries in RUN_BY"
        for start, how in rc.RUN_BY[readme]:
            assert any(c.startswith(start) for c in rc.commands(readme)), (readme, start)
            for file, name in re.findall(r"(test_\w+\.py)::(test_\w+)", how):
                assert name in tests.get(file, ()), f"{readme}: {file}::{name} does not exist"


# The first test to use readme_clone waits for the quick start's install.
CLONE_TIMEOUT = pytest.mark.timeout(600)


@CLONE_TIMEOUT
def test_quick_start_as_written(readme_clone):
    """The quick start's line, run from the top of a fresh copy: it installs tcplock into .venv
    and starts the demo on 9000; a second client waits while the first is in, and is then
    greeted as the only client; Ctrl-C stops it with status 0 (the readme_clone fixture)."""
    _, seen = readme_clone
    out = seen["output"]
    assert seen["first"].startswith(b"demo backend: you are client #1; clients connected now: 1")
    assert seen["second while the first is in"] == b"", out
    assert seen["second"].startswith(b"demo backend: you are client #2; clients connected now: 1")
    assert seen["exit status on Ctrl-C"] == 0, out


def test_ci_runs_the_readme_test_command():
    """The README's command for the test suite is the one .ci/run runs, as written."""
    cmd = rc.command("README.md", "python3 -m venv .venv && .venv/bin/pip install -e '.[test]'")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert cmd in ci, f".ci/run does not run {cmd!r}"


STATUS_CURLS = (
    "curl -s localhost:9100/status",
    "curl -s -X POST localhost:9100/pause",
    "curl -s -X POST localhost:9100/backends/127.0.0.1:2004/drain",
)


@CLONE_TIMEOUT
@pytest.mark.parametrize(
    "start, backends",
    [
        ("tcplock --listen 9000 --proxy-port 2003", [2003]),
        ("tcplock -l 9000 -p 2003 -t 2m --restart-cmd", [2003]),
        (
            "tcplock -l 9000 --backend 127.0.0.1:2003 --backend 127.0.0.1:2004 --backend",
            [2003, 2004, 2005],
        ),
    ],
)
def test_readme_commands_as_written(readme_clone, make_backend, start, backends):
    """The README's tcplock commands, in a shell with the quick start's venv activated, in
    front of echo backends on the ports they name: a client is relayed through port 9000; the
    pool's command also serves the status section's curl commands on 9100."""
    clone, _ = readme_clone
    cmd = rc.command("README.md", start)
    rc.ensure_free(9000, 9100)
    for port in backends:
        make_backend("echo", port=port)
    shell = rc.Shell(cmd, cwd=clone, env=rc.activated(clone))
    try:
        shell.wait_for(r"listening on 127\.0\.0\.1:9000\b", timeout=30)
        c = connect(9000)
        c.sendall(b"hello")
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c, timeout=10) == b"hello"
        c.close()
        if len(backends) > 1:
            status, paused, drained = (
                json.loads(rc.run(curl, cwd=clone).stdout)
                for curl in (rc.command("README.md", s) for s in STATUS_CURLS)
            )
            assert [b["address"] for b in status["backends"]] == [
                f"127.0.0.1:{p}" for p in backends
            ]
            assert paused == {"paused": True}
            assert drained["address"] == "127.0.0.1:2004" and drained["state"] == "draining"
        assert shell.stop(signal.SIGINT) == 0, shell.output()
    finally:
        shell.kill()


def test_bench_help_as_written():
    out = rc.run(rc.command("bench/README.md", "bash bench/run --help"), cwd=ROOT, timeout=60)
    assert "--smoke" in out.stdout + out.stderr


# --- packaging -----------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_pip_wheel_builds_a_wheel_that_installs_the_command(readme_clone, tmp_path):
    """pyproject.toml is the project's metadata and build system: `pip wheel .` in a fresh
    copy builds a wheel, and the wheel installed into a new venv gives the `tcplock` command."""
    clone, _ = readme_clone
    wheels = tmp_path / "wheels"
    rc.run(f"python3 -m pip wheel --no-deps -w {wheels} .", cwd=clone, timeout=500)
    (wheel,) = wheels.glob("tcplock-*.whl")
    venv = tmp_path / "venv"
    rc.run(f"python3 -m venv {venv} && {venv}/bin/pip install {wheel}", cwd=tmp_path, timeout=500)
    version = rc.run(f"{venv}/bin/tcplock --version", cwd=tmp_path, timeout=60).stdout
    assert version.strip() == f"tcplock {__version__}"
    # What installers read: the dependencies, the oldest Python, the licence as SPDX.
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(f"tcplock-{__version__}.dist-info/METADATA").decode()
    for line in (
        "Requires-Python: >=3.9",
        "License-Expression: MIT",
        "Requires-Dist: gevent>=22.10",
        "Requires-Dist: prometheus_client>=0.16",
    ):
        assert line in metadata.splitlines(), line
