"""The settings table as the library sees it: :func:`tcplock.settings.validate` takes what the
command line takes and refuses the rest with a ValueError naming the setting, for any input;
the defaults are the library's; and every setting is documented."""

import argparse
import ipaddress
import math
import re
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcplock.settings import (
    LIBRARY,
    SETTINGS,
    check_together,
    default,
    parse_duration,
    parse_size,
    validate,
)

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent

# The rules, written out here on their own, so that the table is checked against them and not
# against itself: (a good value, what it becomes, whether None is taken and as what).
DURATION_OFF = dict(good=2, normal=2.0, none=True)  # the CLI takes "off"
DURATION = dict(good=0.5, normal=0.5, none=False)  # neither "off" nor 0
DURATION_ZERO = dict(good=0, normal=0.0, none=False)  # 0, but not "off"
HOOK = dict(good=print, normal=print, none=True)
SHELL = dict(good="unoserver --port 2003", normal="unoserver --port 2003", none=True)
RULES = {
    "slots": dict(good=3, normal=3, none=False),
    "timeout": DURATION_OFF,
    "queue_timeout": DURATION_OFF,
    "max_queue": dict(good=0, normal=0, none=True),
    "connect_timeout": DURATION,
    "check_interval": DURATION,
    "finish_timeout": DURATION_ZERO,
    "client_finish_timeout": DURATION_ZERO,
    "hook_timeout": DURATION_OFF,
    "drain_timeout": DURATION_ZERO,
    "on_activate": HOOK,
    "on_timeout": HOOK,
    "restart": HOOK,
    "restart_every": dict(good=1, normal=1, none=True),
    "restart_on_timeout": dict(good=True, normal=True, none=False),
    "ready_timeout": DURATION_OFF,
    "backend_cmd": SHELL,
    "ready_cmd": SHELL,
    "restart_above_rss": dict(good=800 << 20, normal=800 << 20, none=True),
    "stop_timeout": DURATION_ZERO,
    "spares": dict(good=1, normal=1, none=False),
    "allow": dict(
        good=["10.0.0.0/8", ipaddress.ip_network("::1/128")],
        normal=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")),
        none=True,
    ),
    "accept_proxy": dict(good=True, normal=True, none=False),
    "trusted_proxy": dict(  # None: loopback
        good=["10.0.0.5"], normal=(ipaddress.ip_network("10.0.0.5/32"),), none=True
    ),
    "proxy_header_timeout": DURATION,
    "send_proxy": dict(good=True, normal=True, none=False),
    "send_proxy_v2": dict(good=True, normal=True, none=False),
}
FLAGS = ["restart_on_timeout", "accept_proxy", "send_proxy", "send_proxy_v2"]
DEFAULTS = {
    "slots": 1,
    "timeout": None,
    "queue_timeout": None,
    "max_queue": None,
    "connect_timeout": 5.0,
    "check_interval": 2.0,
    "finish_timeout": 10.0,
    "client_finish_timeout": 10.0,
    "hook_timeout": 60.0,
    "drain_timeout": 10.0,
    "on_activate": None,
    "on_timeout": None,
    "restart": None,
    "restart_every": None,
    "restart_on_timeout": False,
    "ready_timeout": 30.0,
    "backend_cmd": None,
    "ready_cmd": None,
    "restart_above_rss": None,
    "stop_timeout": 10.0,
    "spares": 0,
    "allow": None,
    "accept_proxy": False,
    "trusted_proxy": None,
    "proxy_header_timeout": 5.0,
    "send_proxy": False,
    "send_proxy_v2": False,
}
DURATIONS = [a for a, r in RULES.items() if r in (DURATION_OFF, DURATION, DURATION_ZERO)]
NUMBERS = DURATIONS + ["slots", "max_queue", "restart_every", "restart_above_rss", "spares"]
SHELLS = [a for a, r in RULES.items() if r is SHELL]


def refused(attr, value):
    with pytest.raises(ValueError) as e:
        validate(attr, value)
    message = str(e.value)
    assert message.startswith(f"{attr} "), message
    return message


def test_the_library_settings_are_these():
    assert set(LIBRARY) == set(RULES)


@pytest.mark.parametrize("attr", sorted(RULES))
def test_a_good_value_is_taken_normalised(attr):
    rule = RULES[attr]
    value = validate(attr, rule["good"])
    assert value == rule["normal"] and type(value) is type(rule["normal"])


@pytest.mark.parametrize("attr", sorted(RULES))
def test_none_is_no_limit_where_the_command_line_takes_off_and_refused_elsewhere(attr):
    if RULES[attr]["none"]:
        assert validate(attr, None) is None
    else:
        refused(attr, None)


def test_none_for_connect_timeout_names_the_setting():
    assert refused("connect_timeout", None) == (
        "connect_timeout must be a positive number of seconds, not None"
    )


@pytest.mark.parametrize("attr", NUMBERS)
@pytest.mark.parametrize("value", [-1, -0.5, -(10**400), float("-inf")])
def test_a_negative_number_is_refused(attr, value):
    refused(attr, value)


@pytest.mark.parametrize("attr", sorted(RULES))
@pytest.mark.parametrize("value", ["5", b"5", object(), 1j, [1], float("nan"), float("inf")])
def test_a_value_of_the_wrong_kind_is_refused(attr, value):
    if attr in ("allow", "trusted_proxy") and isinstance(value, list):
        value = [object()]
    if attr in SHELLS and value == "5":
        value = " \t"  # any text is a command, but an empty one
    refused(attr, value)


@pytest.mark.parametrize("attr", [a for a in RULES if a not in FLAGS])
@pytest.mark.parametrize("value", [True, False])
def test_a_bool_is_not_a_number_nor_a_hook(attr, value):
    refused(attr, value)


@pytest.mark.parametrize("attr", FLAGS)
def test_a_flag_must_be_a_bool(attr):
    assert validate(attr, False) is False
    for value in (0, 1, "yes", None):
        refused(attr, value)


@pytest.mark.parametrize("attr", DURATIONS)
def test_durations(attr):
    assert validate(attr, 250) == 250.0
    assert validate(attr, Fraction(1, 4)) == 0.25
    assert validate(attr, 10**9) == 1e9
    for value in (10**9 + 1, 10**400, 1e300):  # what the command line calls too long
        refused(attr, value)
    if RULES[attr] is DURATION_ZERO:
        assert validate(attr, 0) == 0.0
    else:
        assert "positive" in refused(attr, 0)


def test_counts():
    assert validate("slots", 1) == 1
    for value in (0, 1.0, 2.5):
        refused("slots", value)
    assert validate("max_queue", 0) == 0 and validate("max_queue", 10**6) == 10**6
    refused("max_queue", 1.0)
    refused("restart_every", 0)


def test_allow_takes_networks_and_strings_and_names_a_bad_one():
    assert validate("allow", ()) == ()
    assert validate("allow", iter(["192.168.1.5", " 10.1.2.3/8 "])) == (
        ipaddress.ip_network("192.168.1.5/32"),
        ipaddress.ip_network("10.0.0.0/8"),
    )
    assert validate("allow", [ipaddress.ip_address("::1")]) == (ipaddress.ip_network("::1/128"),)
    assert "'10.0.0.1/33'" in refused("allow", ["10.0.0.0/8", "10.0.0.1/33"])
    refused("allow", ["nope"])
    refused("allow", [5])  # not a network, although ipaddress would make one of it
    refused("allow", "10.0.0.0/8")  # a string is not a list of networks
    refused("allow", 5)


def test_hooks_must_be_callable():
    class Hook:
        def __call__(self, conn):
            pass

    hook = Hook()
    assert validate("on_activate", hook) is hook
    refused("restart", "systemctl restart x")


def test_an_unknown_setting_is_a_value_error():
    with pytest.raises(ValueError):
        validate("no_such_thing", 1)
    with pytest.raises(ValueError):
        validate(None, 1)


ANYTHING = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.fractions(),
    st.decimals(),
    st.complex_numbers(),
    st.text(max_size=10),
    st.binary(max_size=5),
    st.lists(st.one_of(st.text(max_size=20), st.integers(), st.none()), max_size=3),
    st.just(object()),
    st.just(print),
)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(sorted(RULES)), ANYTHING)
def test_any_value_is_taken_or_refused_with_a_value_error_naming_the_setting(attr, value):
    try:
        result = validate(attr, value)
    except ValueError as e:
        assert str(e).startswith(f"{attr} ")
        return
    if attr in DURATIONS and result is not None:
        assert isinstance(result, float) and math.isfinite(result) and result >= 0
    if attr in ("slots", "max_queue", "restart_every") and result is not None:
        assert type(result) is int and result >= 0
    if attr == "restart_above_rss" and result is not None:
        assert type(result) is int and 1 <= result <= 1 << 60
    if attr in SHELLS and result is not None:
        assert isinstance(result, str) and result.strip() and "\0" not in result


@pytest.mark.parametrize("attr", DURATIONS)
def test_the_library_takes_off_and_zero_exactly_where_the_command_line_does(attr):
    parse = LIBRARY[attr].parse

    def cli_takes(text):
        try:
            parse(text)
        except Exception:
            return False
        return True

    def library_takes(value):
        try:
            validate(attr, value)
        except ValueError:
            return False
        return True

    assert cli_takes("off") == library_takes(None)
    assert cli_takes("0") == library_takes(0)


@pytest.mark.parametrize("attr", sorted(DEFAULTS))
def test_the_defaults_are_the_librarys(attr):
    assert default(attr) == DEFAULTS[attr]
    assert validate(attr, default(attr)) == default(attr)


def test_a_lock_made_without_settings_has_the_defaults():
    from tcplock import TCPLock

    lock = TCPLock(("127.0.0.1", 0), ("127.0.0.1", 1))  # never started
    for attr in DEFAULTS:
        assert getattr(lock, attr) == default(attr), attr


def test_restarting_after_a_count_or_a_timeout_needs_a_restart():
    check_together({"restart_every": 2, "restart": print})
    check_together({"restart_every": None, "restart_on_timeout": False})
    check_together({"restart_every": 2, "restart_on_timeout": True, "backend_cmd": "x"})
    for values in ({"restart_every": 2}, {"restart_on_timeout": True, "restart": None}):
        with pytest.raises(ValueError, match="restart_every and restart_on_timeout"):
            check_together(values)


def test_a_backend_tcplock_runs_takes_no_restart_callable_and_a_memory_limit_needs_one():
    check_together({"backend_cmd": "x", "restart_above_rss": 1 << 20})
    with pytest.raises(ValueError, match="backend_cmd and restart"):
        check_together({"backend_cmd": "x", "restart": print})
    with pytest.raises(ValueError, match="restart_above_rss needs backend_cmd"):
        check_together({"restart_above_rss": 1 << 20})


@pytest.mark.parametrize(
    "text, size",
    [
        ("800M", 800 << 20),
        ("2G", 2 << 30),
        ("1.5g", 3 << 29),
        ("512K", 512 << 10),
        ("1T", 1 << 40),
        ("800MB", 800 << 20),
        (" 800 MiB ", 800 << 20),
        ("4096", 4096),
        ("100b", 100),
        ("off", None),
    ],
)
def test_sizes_take_binary_multiples(text, size):
    assert LIBRARY["restart_above_rss"].parse(text) == size


@pytest.mark.parametrize(
    "text", ["", "M", "-1M", "0", "0.1", "2X", "1.5.5G", "2 G B", "2^30", "1e9"]
)
def test_a_bad_size_is_one_line_naming_it(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError) as e:
        LIBRARY["restart_above_rss"].parse(text)
    assert "\n" not in str(e.value) and "size" in str(e.value)


def test_one_proxy_header_version_at_most_is_sent():
    check_together({"send_proxy": True, "send_proxy_v2": False})
    check_together({"send_proxy": False, "send_proxy_v2": True})
    with pytest.raises(ValueError, match="send_proxy and send_proxy_v2"):
        check_together({"send_proxy": True, "send_proxy_v2": True})


def test_what_may_change_on_a_running_lock():
    fixed = {s.name for s in SETTINGS if not s.reload}
    assert fixed == {"config", "listen", "status", "agent-check", "demo", "backend-cmd"}


def test_every_setting_is_in_the_readme_table_and_the_sample_config():
    section = (ROOT / "README.md").read_text().split("\n## Settings\n", 1)[1].split("\n## ")[0]
    conf = (ROOT / "contrib" / "tcplock.conf").read_text()
    conf_keys = re.findall(r"^(?:# )?([a-z][a-z0-9-]*) = ", conf, re.M)
    for s in SETTINGS:
        row = next(line for line in section.splitlines() if line.startswith(f"| `{s.flags[0]}`"))
        assert f"`{s.name}`" in row and f"`{s.env}`" in row and s.help in row
        assert row.count(" | ") == 5 and (" yes |" in row) == s.reload
        if s.name != "config":  # a config file does not name another
            assert s.name in conf_keys
    assert len(conf_keys) == len(SETTINGS) - 1


# -- numbers: ASCII digits within a sane range, for every count and every port -----------------

# Texts no count or port takes: other scripts' digits, signs, separators, exponents, and
# numbers beyond any range (one too long to convert at all).
NOT_NUMBERS = ["٩٠٠٠", "٣", "１２", "²", "1e9", "1_000", "+5", "0x10", "5.", "", "9 9"]
TOO_LARGE = ["99999999999999999999", "1" * 5000]
WHOLE_NUMBERS = [s for s in SETTINGS if s.kind in ("count", "port", "address", "addresses")]


def as_written(setting, number):
    """``number`` where ``setting`` takes one: the port of an address."""
    return f"127.0.0.1:{number}" if setting.kind in ("address", "addresses") else number


@pytest.mark.parametrize("setting", WHOLE_NUMBERS, ids=lambda s: s.name)
@pytest.mark.parametrize("text", NOT_NUMBERS + TOO_LARGE)
def test_every_count_and_port_is_ascii_digits_within_its_range(setting, text):
    with pytest.raises(argparse.ArgumentTypeError) as e:
        setting.parse(as_written(setting, text))
    message = str(e.value)
    assert "\n" not in message and len(message) < 200, message
    if text in TOO_LARGE:
        assert "at most 1000000000" in message or "out of range" in message, message
    assert setting.parse(as_written(setting, " 0012 ")) in (12, ("127.0.0.1", 12))


def test_counts_have_a_largest_value_in_the_library_as_on_the_command_line():
    for attr in ("slots", "max_queue", "restart_every"):
        assert validate(attr, 10**9) == 10**9
        for value in (10**9 + 1, 10**20):
            assert "from" in refused(attr, value)
    parse = next(s for s in SETTINGS if s.name == "slots").parse
    assert parse("1000000000") == 10**9
    assert str(pytest.raises(argparse.ArgumentTypeError, parse, "1000000001").value) == (
        "must be at most 1000000000, not 1000000001"
    )
    assert str(pytest.raises(argparse.ArgumentTypeError, parse, "-3").value) == (
        "must be at least 1, not -3"
    )


@pytest.mark.parametrize(
    "parse, text",
    [
        (parse_size, "٨٠٠M"),  # Arabic-Indic 800
        (parse_size, "5\u212a"),  # the Kelvin sign, which matches 'k' ignoring case
        (parse_duration, "٥s"),
        (parse_duration, "5\u017f"),  # a long s, which matches 's' ignoring case
    ],
)
def test_sizes_and_durations_are_ascii_too(parse, text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse(text)
