"""The README's settings table and contrib/tcplock.conf are printed from the settings table and
checked here in full (every column, defaults and help included), and the parser is checked
against the same table, so that the documentation cannot drift from the code."""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tcplock.cli import build_parser, parse_args
from tcplock.settings import SETTINGS, render_conf, render_markdown

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CONF = ROOT / "contrib" / "tcplock.conf"


def readme_settings_section() -> str:
    return README.read_text().split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]


def readme_table() -> str:
    lines = [line for line in readme_settings_section().splitlines() if line.startswith("|")]
    return "\n".join(lines) + "\n"


def test_readme_settings_table_is_the_one_printed_from_the_settings():
    assert readme_table() == render_markdown(), (
        "README settings table is out of date; replace it with the output of "
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


def test_the_parser_has_one_option_per_setting_with_its_help_and_default():
    actions = [a for a in build_parser()._actions if a.dest not in ("help", "version")]
    assert [tuple(a.option_strings) for a in actions] == [s.flags for s in SETTINGS]
    for action, setting in zip(actions, SETTINGS):
        assert action.help.replace("%%", "%") == setting.help_text, setting.name
        assert action.env_var == setting.env, setting.name
        if setting.name != "config":
            assert action.default == setting.default, setting.name
            assert action.metavar == (None if setting.action == "store_true" else setting.metavar)


def test_help_shows_every_setting_with_its_default():
    out = subprocess.run(
        [sys.executable, "-m", "tcplock", "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    words = " ".join(out.split())
    for setting in SETTINGS:
        assert " ".join(setting.help_text.split()) in words, setting.name
        assert setting.env in words or setting.name == "config"


def test_every_environment_variable_the_parser_reads_is_documented():
    readme = README.read_text()
    for action in build_parser()._actions:
        env = getattr(action, "env_var", None)
        if env:
            assert env in readme, env


def test_sample_config_sets_the_required_settings_and_every_value_parses(tmp_path):
    text = CONF.read_text()
    set_keys = re.findall(r"^([a-z][a-z-]*)\s*=", text, re.M)
    assert sorted(set_keys) == sorted(s.name for s in SETTINGS if s.required)
    # Uncommented, every sample value is accepted by the parser: the pool's backends in place
    # of the single backend's host and port, which cannot be given with them; and backends
    # that tcplock runs (with their memory limit) in place of the restart command.
    supervised = r"(backend|backend-cmd|restart-above-rss)\b"
    single = re.sub(rf"^#\s*((?!{supervised})[a-z][a-z-]*\s*=)", r"\1", text, flags=re.M)
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
