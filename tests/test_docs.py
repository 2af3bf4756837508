"""The README's settings table and contrib/tcplock.conf are checked against the parser, so the
documentation cannot drift from the code."""

import argparse
import re
from pathlib import Path

from tcplock.cli import ENV_PREFIX, build_parser, parse_args

ROOT = Path(__file__).resolve().parent.parent
SKIP = {"help", "version"}


def settings():
    for action in build_parser()._actions:
        if action.dest in SKIP:
            continue
        yield action


def table_row(action) -> str:
    flags = ", ".join(f"`{s}`" for s in action.option_strings)
    key = action.option_strings[-1].lstrip("-")
    env = ENV_PREFIX + key.upper().replace("-", "_")
    return f"| {flags} | `{key}` | `{env}` |"


def render_table() -> str:
    """The table the README carries (its first three columns are checked)."""
    lines = ["| Option | Config key | Environment | Meaning |", "|---|---|---|---|"]
    for action in settings():
        help_text = (action.help or "") % {"default": action.default}
        lines.append(f"{table_row(action)} {help_text} |")
    return "\n".join(lines)


def test_readme_settings_table_matches_parser():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `-")]
    expected = [table_row(a) for a in settings()]
    assert [r[: len(e)] for r, e in zip(rows, expected)] == expected, (
        "README settings table is out of date; expected:\n" + render_table()
    )
    assert len(rows) == len(expected)


def test_every_environment_variable_the_parser_reads_is_documented():
    readme = (ROOT / "README.md").read_text()
    for action in build_parser()._actions:
        env = getattr(action, "env_var", None)
        if env:
            assert env in readme, env


def test_sample_config_names_every_setting_and_parses():
    text = (ROOT / "contrib" / "tcplock.conf").read_text()
    keys = re.findall(r"^#?\s*([a-z][a-z-]*)\s*=", text, re.M)
    expected = [
        a.option_strings[-1].lstrip("-")
        for a in settings()
        if a.dest != "demo" and not getattr(a, "is_config_file_arg", False)
    ]
    assert sorted(set(keys)) == sorted(expected)
    # Uncommented, every sample value is accepted by the parser.
    uncommented = re.sub(r"^#\s*([a-z][a-z-]*\s*=)", r"\1", text, flags=re.M)
    path = ROOT / "tests" / ".sample.conf"
    try:
        path.write_text(uncommented)
        args = parse_args(["-c", str(path)], env={})
    finally:
        path.unlink()
    assert isinstance(args, argparse.Namespace)
