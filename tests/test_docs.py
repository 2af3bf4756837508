"""The README's settings table and contrib/tcplock.conf are printed from the settings table and
checked here in full (every column, defaults and help included), and the parser is checked
against the same table, so that the documentation cannot drift from the code."""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tcplock.cli import build_parser, parse_args
from tcplock.settings import SETTINGS, grouped, render_conf, render_markdown

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
