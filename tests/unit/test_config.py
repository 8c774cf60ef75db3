"""Mount options, in-process: every bad value is one line naming the option, the value and
what is expected, before anything is started; the parsers behind ``vrangefs mount`` and
``mount.vrangefs`` agree."""

from __future__ import annotations

import argparse
import mmap
from pathlib import Path

import pytest

from vrangefs import cli, config, mountinfo
from vrangefs.config import Machine, Setting, UserError
from vrangefs.protocol import PAGE_SIZE

GiB = 1 << 30
TiB = 1 << 40
MACHINE = Machine(ram=16 * GiB, memory=8 * GiB)  # e.g. a cgroup limit of 8 GiB


def cap(text: str, machine: Machine = MACHINE) -> int:
    return config.parse_memory_cap(Setting(text, "--memory-cap"), machine)


def build(
    *, options: tuple[str, ...] = (), machine: Machine = MACHINE, **given: str
) -> tuple[config.MountConfig, list[str]]:
    sorted_options = config.sort_options(list(options))
    settings = config.settings_of(given, sorted_options)
    return config.build_config("/mnt/x", settings, sorted_options, machine)


def message(excinfo: pytest.ExceptionInfo[UserError]) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def _maps(size: int) -> bool:
    try:
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000)
    except OSError:
        return False
    m.close()
    return True


# -- the memory cap -------------------------------------------------------------------------
def test_cap_values() -> None:
    assert cap("4096") == PAGE_SIZE
    assert cap("512M") == 512 << 20
    assert cap("25%") == 4 * GiB  # of RAM, not of the cgroup limit
    assert cap("1G", Machine(ram=GiB, memory=GiB)) == GiB


@pytest.mark.parametrize("text", ["1", "4095", "0.00001%"])
def test_cap_below_one_page(text: str) -> None:
    with pytest.raises(UserError) as e:
        cap(text)
    text_shown = message(e)
    assert text_shown.startswith(f"invalid --memory-cap {text!r}: ")
    assert "less than one page" in text_shown
    assert "at least 4096 bytes" in text_shown


@pytest.mark.parametrize("text", ["9223372036854775807", "1000000T"])
def test_cap_that_cannot_be_mapped(text: str) -> None:
    with pytest.raises(UserError) as e:
        cap(text)
    shown = message(e)
    assert shown.startswith(f"invalid --memory-cap {text!r}: ")
    assert "one arena" in shown
    assert "at most about" in shown


def test_100t_is_refused_where_it_cannot_be_mapped() -> None:
    if _maps(100 * TiB):
        pytest.skip("this machine can map 100 TiB")
    with pytest.raises(UserError, match="at most about"):
        cap("100T")


def test_arena_problem_names_the_limit() -> None:
    assert config.arena_problem(64 << 20) is None
    problem = config.arena_problem(2**62)
    assert problem is not None
    assert "vm.overcommit_memory" in problem or "ulimit -v" in problem


@pytest.mark.parametrize("text", ["abc", "0", "-5", "150%", "12X", "", "1.5G", " 1G"])
def test_cap_garbage(text: str) -> None:
    with pytest.raises(UserError) as e:
        cap(text)
    shown = message(e)
    assert shown.startswith(f"invalid --memory-cap {text!r}: expected ")


def test_cap_above_memory_warns_once() -> None:
    assert build(memory_cap="8G")[1] == []
    _, warnings = build(memory_cap="12G")
    assert len(warnings) == 1
    assert "memory-cgroup limit (8.0 GiB)" in warnings[0]
    _, warnings = build(memory_cap="20G", machine=Machine(ram=16 * GiB, memory=16 * GiB))
    assert len(warnings) == 1
    assert "above this machine's RAM (16.0 GiB)" in warnings[0]


# -- -o options --------------------------------------------------------------------------------
def test_sort_options() -> None:
    out = config.sort_options(
        ["size=1G,noauto,allow_other", "mode=0750,uid=0,gid=4294967294,debug,x-systemd.foo", ""]
    )
    assert out.settings == {"memory_cap": Setting("1G", "-o size=")}
    assert out.root == {"mode": 0o750, "uid": 0, "gid": 4294967294}
    assert out.fuse == ["allow_other"]
    assert out.debug


@pytest.mark.parametrize(
    ("opt", "expected"),
    [
        ("uid=99999999999", "expected a number from 0 to 4294967294"),
        ("uid=4294967295", "expected a number from 0 to 4294967294"),
        ("gid=-1", "expected a number from 0 to 4294967294"),
        ("uid=me", "expected a number"),
        ("uid=+5", "expected a number"),
        ("mode=8888", "expected an octal mode from 0 to 7777"),
        ("mode=17777", "expected an octal mode"),
        ("mode=", "expected an octal mode"),
        ("mode=0o777", "expected an octal mode"),
    ],
)
def test_bad_root_options(opt: str, expected: str) -> None:
    key, _, value = opt.partition("=")
    with pytest.raises(UserError) as e:
        config.sort_options([f"size=1G,{opt}"])
    assert message(e).startswith(f"invalid -o {key}={value!r}: ")
    assert expected in message(e)


def test_o_setting_wins_and_is_named_as_written() -> None:
    built, _ = build(memory_cap="1G", options=("size=2G",))
    assert built.memory_cap == 2 * GiB
    with pytest.raises(UserError) as e:
        build(memory_cap="1G", options=("size=lots",))
    assert message(e).startswith("invalid -o size='lots': expected ")


# -- the other settings -------------------------------------------------------------------
@pytest.mark.parametrize("text", ["-1", "0", "nan", "inf", "abc", "", "0.001", "3601"])
def test_bad_pressure_interval(text: str) -> None:
    with pytest.raises(UserError) as e:
        build(pressure_interval=text)
    assert message(e) == (
        f"invalid --pressure-interval {text!r}: expected a number of seconds from 0.01 to "
        "3600, e.g. 0.5"
    )


@pytest.mark.parametrize("text", ["0.01", "0.5", "3600"])
def test_good_pressure_interval(text: str) -> None:
    built, _ = build(pressure_interval=text)
    assert built.pressure is not None
    assert built.pressure.interval == float(text)


@pytest.mark.parametrize("pressure", ["on", "off"])
def test_bad_min_free_even_when_pressure_purging_is_off(pressure: str) -> None:
    with pytest.raises(UserError) as e:
        build(min_free="garbage", pressure_purge=pressure)
    assert message(e).startswith("invalid --min-free 'garbage': expected a positive number")


def test_min_free_percentage_is_of_the_memory_the_daemon_may_use() -> None:
    built, _ = build(min_free="50%")
    assert built.pressure == config.PressureConfig(min_free=4 * GiB, interval=0.5)
    assert build(pressure_purge="off")[0].pressure is None


@pytest.mark.parametrize("text", ["0", "0%", "101%", "1.5", "-5%", "abc", "nan", "inf", ""])
def test_bad_watermark(text: str) -> None:
    with pytest.raises(UserError) as e:
        build(high_watermark=text)
    assert message(e) == (
        f"invalid --high-watermark {text!r}: expected a percentage above 0% and up to 100%, "
        "e.g. 95%"
    )


def test_low_watermark_above_high() -> None:
    with pytest.raises(UserError) as e:
        build(high_watermark="90%", options=("low_watermark=99%",))
    assert message(e) == (
        "invalid -o low_watermark='99%': it is above --high-watermark '90%'; expected low <= high"
    )
    built, _ = build(high_watermark="0.9", low_watermark="90%")
    assert (built.high_watermark, built.low_watermark) == (0.9, 0.9)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [("purged_reads", "maybe", "'eio' or 'zeros'"), ("pressure_purge", "yes", "'on' or 'off'")],
)
def test_bad_choice(name: str, text: str, expected: str) -> None:
    sorted_options = config.sort_options([])
    settings = config.settings_of({name: text}, sorted_options)
    with pytest.raises(UserError) as e:
        config.build_config("/mnt/x", settings, sorted_options, MACHINE)
    assert message(e) == f"invalid {config.option_name(name)} {text!r}: expected {expected}"


def test_defaults() -> None:
    built, warnings = build()
    assert built == config.MountConfig(
        mountpoint="/mnt/x",
        memory_cap=8 * GiB,
        pressure=config.PressureConfig(min_free=8 * GiB * 5 // 100, interval=0.5),
        pin_limit=4 * GiB,  # half the cap
    )
    assert warnings == []


def test_pin_limit_is_a_size_or_a_share_of_the_cap() -> None:
    assert build(pin_limit="256M")[0].pin_limit == 256 << 20
    assert build(memory_cap="1G", pin_limit="25%")[0].pin_limit == GiB // 4
    assert build(memory_cap="1G", options=("pin_limit=2G",))[0].pin_limit == 2 * GiB


@pytest.mark.parametrize("text", ["0", "0%", "101%", "-5", "lots", ""])
def test_bad_pin_limit(text: str) -> None:
    with pytest.raises(UserError) as e:
        build(pin_limit=text)
    assert message(e).startswith(f"invalid --pin-limit {text!r}: expected a positive number")
    assert "percentage of the memory cap" in message(e)


# -- the command line, in-process -------------------------------------------------------------
BAD_MOUNT_ARGS = [
    (["--memory-cap", "4095"], "invalid --memory-cap '4095': "),
    (["--memory-cap", "9223372036854775807"], "invalid --memory-cap '9223372036854775807': "),
    (["-o", "uid=99999999999"], "invalid -o uid='99999999999': "),
    (["--pressure-interval", "-1"], "invalid --pressure-interval '-1': "),
    (["--min-free", "garbage"], "invalid --min-free 'garbage': "),
    (["--low-watermark", "99%", "--high-watermark", "50%"], "invalid --low-watermark '99%': "),
    (["-o", "purged_reads=maybe"], "invalid -o purged_reads='maybe': "),
]


@pytest.mark.parametrize(("args", "start"), BAD_MOUNT_ARGS)
def test_main_refuses_bad_mount_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], start: str
) -> None:
    assert cli.main(["mount", str(tmp_path), *args]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"vrangefs: {start}")
    assert err.count("\n") == 1
    assert not mountinfo.is_mounted(tmp_path)


def test_mount_helper_refuses_bad_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.mount_helper(["vrangefs", str(tmp_path), "-o", "rw,uid=99999999999"]) == 1
    err = capsys.readouterr().err
    assert err == "vrangefs: invalid -o uid='99999999999': expected a number from 0 to 4294967294\n"
    assert not mountinfo.is_mounted(tmp_path)


def test_mount_helper_fake_does_nothing(tmp_path: Path) -> None:
    assert cli.mount_helper(["vrangefs", str(tmp_path), "-f", "-o", "size=lots"]) == 0


def test_workers_is_gone() -> None:
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["mount", "/mnt/x", "--workers", "4"])
    assert e.value.code == 2


# -- the parsers, for the man pages ----------------------------------------------------------
def _actions(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += [(f"{name} {n}", a) for n, a in _actions(sub)]
        else:
            out.append((action.dest, action))
    return out


@pytest.mark.parametrize("build_parser", [cli.build_parser, cli.build_mount_helper_parser])
def test_every_option_has_help(build_parser: object) -> None:
    assert callable(build_parser)
    parser = build_parser()
    assert parser.description
    for name, action in _actions(parser):
        if name.endswith("ready_fd"):
            assert action.help == argparse.SUPPRESS  # internal: launch's pipe
        else:
            assert action.help, f"{name} has no help"


def test_mount_helper_parser_takes_what_mount_passes() -> None:
    args = cli.build_mount_helper_parser().parse_args(
        ["vrangefs", "/mnt/cache", "-o", "rw,size=1G", "-o", "noauto", "-n", "-s", "-v"]
    )
    assert (args.source, args.mountpoint, args.options) == (
        "vrangefs",
        "/mnt/cache",
        ["rw,size=1G", "noauto"],
    )
    assert not args.fake
