"""The xattr value formats and the page rounding of vrangefs.protocol."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vrangefs import protocol
from vrangefs.pagestore import PAGE_SIZE
from vrangefs.protocol import (
    MAX_OFFSET,
    RangeError,
    XattrValueError,
    format_ranges,
    format_stats,
    nonvolatile_pages,
    parse_purge,
    parse_range,
    parse_ranges,
    parse_size,
    parse_stats,
    volatile_pages,
)

K, M, G, T = 1024, 1024**2, 1024**3, 1024**4


def test_names() -> None:
    names = [
        protocol.VOLATILE,
        protocol.NONVOLATILE,
        protocol.PURGED,
        protocol.STATS,
        protocol.PURGE,
    ]
    assert names == [
        "user.vrange.volatile",
        "user.vrange.nonvolatile",
        "user.vrange.purged",
        "user.vrange.stats",
        "user.vrange.purge",
    ]
    assert all(name.startswith(protocol.XATTR_PREFIX) for name in names)
    names_b = [
        protocol.VOLATILE_B,
        protocol.NONVOLATILE_B,
        protocol.PURGED_B,
        protocol.STATS_B,
        protocol.PURGE_B,
    ]
    assert names_b == [name.encode() for name in names]
    assert protocol.XATTR_PREFIX_B == b"user.vrange."


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"0,0", (0, 0)),
        (b"0,4096", (0, 4096)),
        (b"4096,0", (4096, 0)),
        (b"10,20\n", (10, 20)),
        (b"4K,1M", (4 * K, M)),
        (b"4k,1m", (4 * K, M)),
        (b"1G,2g", (G, 2 * G)),
        (b"1T,0", (T, 0)),
        (b"4KiB,1MiB", (4 * K, M)),
        (b"4kib,1GIB", (4 * K, G)),
        (b"0K,0", (0, 0)),
        (b"%d,0" % MAX_OFFSET, (MAX_OFFSET, 0)),
        (b"1,%d" % (MAX_OFFSET - 1), (1, MAX_OFFSET - 1)),
        (b"8388607T,1023G", (8388607 * T, 1023 * G)),
    ],
)
def test_parse_range_accepts(value: bytes, expected: tuple[int, int]) -> None:
    assert parse_range(value) == expected


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (b"", errno.EINVAL),
        (b"\n", errno.EINVAL),
        (b"abc", errno.EINVAL),
        (b"10", errno.EINVAL),
        (b"10,", errno.EINVAL),
        (b",10", errno.EINVAL),
        (b",", errno.EINVAL),
        (b"1,2,3", errno.EINVAL),
        (b"-5,10", errno.EINVAL),
        (b"5,-10", errno.EINVAL),
        (b"+5,10", errno.EINVAL),
        (b" 5,10", errno.EINVAL),
        (b"5, 10", errno.EINVAL),
        (b"5 ,10", errno.EINVAL),
        (b"5,10 ", errno.EINVAL),
        (b"5,10\n\n", errno.EINVAL),
        (b"5,10\r\n", errno.EINVAL),
        (b"5,10\t", errno.EINVAL),
        (b"5,10\x00", errno.EINVAL),
        (b"\x005,10", errno.EINVAL),
        (b"0x10,0", errno.EINVAL),
        (b"010,0", errno.EINVAL),
        (b"00,0", errno.EINVAL),
        (b"1.5K,0", errno.EINVAL),
        (b"1e3,0", errno.EINVAL),
        (b"4KB,0", errno.EINVAL),
        (b"4Ki,0", errno.EINVAL),
        (b"4P,0", errno.EINVAL),
        (b"K,0", errno.EINVAL),
        (b"4 K,0", errno.EINVAL),
        ("٣,0".encode(), errno.EINVAL),
        (b"1;2", errno.EINVAL),
        (b"1,2\n3,4", errno.EINVAL),
        (b"%d,0" % 2**63, errno.ERANGE),
        (b"0,%d" % 2**63, errno.ERANGE),
        (b"%d,1" % MAX_OFFSET, errno.ERANGE),
        (b"%d,%d" % (2**62, 2**62), errno.ERANGE),
        (b"8388608T,0", errno.ERANGE),
        (b"0,9999999999G", errno.ERANGE),
        (b"9" * 30 + b",0", errno.ERANGE),
        (b"1" * 10000 + b",0", errno.ERANGE),
    ],
)
def test_parse_range_rejects(value: bytes, code: int) -> None:
    with pytest.raises(RangeError) as info:
        parse_range(value)
    assert info.value.errno == code
    assert isinstance(info.value, ValueError)
    assert "OFFSET,LENGTH" in str(info.value) or "too large" in str(info.value)


@given(st.text(alphabet="0123456789,kKmMgGtTiIbB\n -+x", max_size=30))
def test_parse_range_fast_path_agrees_with_the_grammar(text: str) -> None:
    """Plain numbers skip the regex; every value parses (or fails) as the regex says."""
    value = text.encode()
    try:
        expected: object = protocol._parse_range_general(value)
    except RangeError as e:
        expected = e.errno
    try:
        got: object = parse_range(value)
    except RangeError as e:
        got = e.errno
    assert got == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"0,0", (0, 0)),
        (b"4096,4096\n", (4096, 4096)),
        (b"9223372036854775807,0", (2**63 - 1, 0)),
        (b"9223372036854775807,1", errno.ERANGE),
        (b"99999999999999999999,0", errno.ERANGE),
        (b"01,1", errno.EINVAL),
        (b"0,00", errno.EINVAL),
        (b"1,", errno.EINVAL),
    ],
)
def test_parse_range_fast_path_edges(value: bytes, expected: object) -> None:
    try:
        got: object = parse_range(value)
    except RangeError as e:
        got = e.errno
    assert got == expected


def test_parse_range_message_names_value() -> None:
    with pytest.raises(RangeError, match="b'abc'"):
        parse_range(b"abc")
    with pytest.raises(RangeError, match=r"\.\.\. \(10002 bytes\)"):
        parse_range(b"1" * 10000 + b",0")


def test_parse_purge() -> None:
    parse_purge(b"all")
    parse_purge(b"all\n")
    for bad in (b"", b"ALL", b"all ", b"some", b"all\n\n"):
        with pytest.raises(XattrValueError) as info:
            parse_purge(bad)
        assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", 1),
        ("4096", 4096),
        ("512M", 512 * M),
        ("512m", 512 * M),
        ("2G", 2 * G),
        ("1T", T),
        ("64K", 64 * K),
        ("1GiB", G),
        ("25%", 4 * G),
        ("100%", 16 * G),
        ("12.5%", 2 * G),
        ("0.5%", 16 * G // 200),
        ("33%", 16 * G * 33 // 100),
    ],
)
def test_parse_size_accepts(text: str, expected: int) -> None:
    assert parse_size(text, total_ram=16 * G) == expected


@pytest.mark.parametrize(
    "text",
    [
        "abc",
        "0",
        "0K",
        "-5",
        "+5",
        "150%",
        "100.5%",
        "0%",
        "0.0%",
        "-5%",
        "%",
        "5 %",
        "",
        " 5M",
        "5M ",
        "5M\n",
        "1.5G",
        "5MB",
        "05M",
        "0x10",
        "1e6",
        str(2**63),
        "8388608T",
        "1" * 100,
        "٣",
    ],
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="size") as info:
        parse_size(text, total_ram=16 * G)
    assert repr(text)[:20] in str(info.value)


def test_parse_size_percentage_needs_ram() -> None:
    assert parse_size("512M") == 512 * M
    with pytest.raises(ValueError, match="RAM"):
        parse_size("25%")
    with pytest.raises(ValueError, match="size"):
        parse_size("1%", total_ram=50)  # rounds down to nothing


@pytest.mark.parametrize(
    ("offset", "length", "size", "expected"),
    [
        # Inward rounding in the middle of a file.
        (0, 4096, 100_000, (0, 1)),
        (0, 4095, 100_000, None),
        (1, 8192, 100_000, (1, 2)),
        (4096, 8192, 100_000, (1, 3)),
        (4095, 8194, 100_000, (1, 3)),
        (100, 200, 100_000, None),
        # Reaching the end of the file: the page holding it counts as whole.
        (0, 0, 10, (0, 1)),
        (0, 10, 10, (0, 1)),
        (0, 1000, 10, (0, 1)),
        (0, 9, 10, None),
        (1, 0, 10, None),
        (0, 0, 4097, (0, 2)),
        (4096, 0, 4097, (1, 2)),
        (4096, 1, 4097, (1, 2)),
        (4097, 0, 8192, None),
        (0, 0, 8192, (0, 2)),
        (4096, 0, 8192, (1, 2)),
        (0, 8191, 8192, (0, 1)),
        # Clipping and empty results.
        (0, 0, 0, None),
        (10, 0, 10, None),
        (20, 5, 10, None),
        (8192, 4096, 8192, None),
        (0, MAX_OFFSET, 3 * 4096 + 1, (0, 4)),
    ],
)
def test_volatile_pages(offset: int, length: int, size: int, expected: object) -> None:
    assert volatile_pages(offset, length, size) == expected


@pytest.mark.parametrize(
    ("offset", "length", "size", "expected"),
    [
        (0, 1, 100_000, (0, 1)),
        (4095, 2, 100_000, (0, 2)),
        (4096, 4096, 100_000, (1, 2)),
        (4096, 4097, 100_000, (1, 3)),
        (100, 200, 100_000, (0, 1)),
        (0, 0, 10, (0, 1)),
        (5, 0, 10, (0, 1)),
        (0, 0, 8193, (0, 3)),
        (8192, 0, 8193, (2, 3)),
        (0, 1000, 4096, (0, 1)),
        (0, 0, 0, None),
        (10, 0, 10, None),
        (20, 5, 10, None),
    ],
)
def test_nonvolatile_pages(offset: int, length: int, size: int, expected: object) -> None:
    assert nonvolatile_pages(offset, length, size) == expected


@given(
    offset=st.integers(0, 10 * PAGE_SIZE),
    length=st.integers(0, 10 * PAGE_SIZE),
    size=st.integers(0, 10 * PAGE_SIZE),
)
def test_rounding_inward_within_outward(offset: int, length: int, size: int) -> None:
    """Every page marked volatile is touched by the range; never a page past the file."""
    inner = volatile_pages(offset, length, size)
    outer = nonvolatile_pages(offset, length, size)
    if outer is None:
        assert inner is None
        return
    assert outer[0] * PAGE_SIZE <= offset
    assert outer[1] * PAGE_SIZE < size + PAGE_SIZE
    if inner is not None:
        assert outer[0] <= inner[0] < inner[1] <= outer[1]
        assert inner[0] * PAGE_SIZE >= offset


def test_rounding_rejects_negatives() -> None:
    with pytest.raises(ValueError, match="negative"):
        volatile_pages(-1, 0, 10)
    with pytest.raises(ValueError, match="negative"):
        nonvolatile_pages(0, -1, 10)


def test_format_ranges() -> None:
    assert format_ranges([]) == b""
    assert format_ranges([(8192, 4096), (0, 10)]) == b"0,10\n8192,4096\n"
    assert format_ranges([(MAX_OFFSET, 0), (1, MAX_OFFSET - 1)]) == b"1,%d\n%d,0\n" % (
        MAX_OFFSET - 1,
        MAX_OFFSET,
    )
    for bad in ([(-1, 5)], [(5, -1)], [(MAX_OFFSET, 1)]):
        with pytest.raises(ValueError, match="negative or too large"):
            format_ranges(bad)


@given(st.lists(st.tuples(st.integers(0, 2**62), st.integers(0, 2**62 - 1))))
def test_ranges_round_trip(ranges: list[tuple[int, int]]) -> None:
    assert parse_ranges(format_ranges(ranges)) == sorted(ranges)


def test_parse_ranges() -> None:
    assert parse_ranges(b"") == []
    assert parse_ranges(b"0,10") == [(0, 10)]
    assert parse_ranges(b"0,10\n20,5\n") == [(0, 10), (20, 5)]
    for bad in (b"\n", b"0,10\n\n", b"0,10\n\n20,5\n", b"4K,0\n", b"0,10 \n", b"x"):
        with pytest.raises(RangeError) as info:
            parse_ranges(bad)
        assert info.value.errno == errno.EINVAL
    with pytest.raises(RangeError) as info:
        parse_ranges(b"%d,1\n" % MAX_OFFSET)
    assert info.value.errno == errno.ERANGE


def test_stats_round_trip() -> None:
    stats: dict[str, int | str] = {"pid": 1234, "memory_cap": 512 * M, "purged_reads": "eio"}
    value = format_stats(stats)
    assert value == b"pid=1234\nmemory_cap=536870912\npurged_reads=eio\n"
    assert parse_stats(value) == stats
    assert list(parse_stats(value)) == list(stats)
    assert parse_stats(b"") == {}
    assert parse_stats(b"a=-3") == {"a": -3}


@pytest.mark.parametrize("stats", [{"Bad": 1}, {"a=b": 1}, {"": 1}, {"a": "x\ny"}])
def test_format_stats_rejects(stats: dict[str, int | str]) -> None:
    with pytest.raises(ValueError, match="statistic"):
        format_stats(stats)


@pytest.mark.parametrize("value", [b"novalue\n", b"=3\n", b"a=1\n\n", b"A=1\n"])
def test_parse_stats_rejects(value: bytes) -> None:
    with pytest.raises(ValueError, match="statistics line"):
        parse_stats(value)
