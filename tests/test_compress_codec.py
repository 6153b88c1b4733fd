"""The wire codec: round trips for every index/value format (hypothesis), the documented size
formula, the checksum, named defects, and a 10^5-payload mutation fuzz."""

import itertools

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moecore import _core
from moecore.errors import CorruptPayload

INDEX = ["varint", "bitmap", "raw"]
VALUES = ["f32", "f16", "bf16", "int8"]


# --- independent references -------------------------------------------------------------------


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def leb128_len(v: int) -> int:
    return max(1, -(-v.bit_length() // 7))


def expected_size(index, values, n, ix, chunk):
    """The size formula from the moecore.compress docs: 44 + I + V."""
    k = len(ix)
    gaps = [int(ix[0])] + [int(b) - int(a) - 1 for a, b in itertools.pairwise(ix)] if k else []
    i_bytes = {
        "varint": sum(leb128_len(d) for d in gaps),
        "bitmap": -(-n // 8),
        "raw": 4 * k,
        "dense": 0,
    }[index]
    v_bytes = {"f32": 4 * k, "f16": 2 * k, "bf16": 2 * k, "int8": k + 4 * -(-k // chunk)}[values]
    return 44 + i_bytes + v_bytes


def expected_values(values, v, chunk):
    """What the decoder must reproduce, computed with numpy / ml_dtypes."""
    v = v.astype(np.float32)
    if values == "f32":
        return v
    if values == "f16":
        return np.clip(v, -65504, 65504).astype(np.float16).astype(np.float32)
    if values == "bf16":
        return v.astype(ml_dtypes.bfloat16).astype(np.float32)
    out = np.empty_like(v)
    for s in range(0, v.size, chunk):
        c = v[s : s + chunk]
        m = np.float32(np.max(np.abs(c)))
        scale = np.float32(m / np.float32(127))
        if scale == 0:
            out[s : s + chunk] = 0
            continue
        if m >= 1e-30:
            r = c * (np.float32(127) / m)
        else:
            r = (c.astype(np.float64) * (127 / np.float64(m))).astype(np.float32)
        q = np.clip(np.rint(r), -127, 127)
        out[s : s + chunk] = q.astype(np.float32) * scale
    return out


# --- property tests ---------------------------------------------------------------------------


@st.composite
def sparse_vectors(draw):
    n = draw(st.integers(1, 3000))
    dense = draw(st.booleans()) and n <= 600
    if dense:
        ix = np.arange(n, dtype=np.uint32)
    else:
        ix = np.array(
            sorted(draw(st.sets(st.integers(0, n - 1), max_size=min(n, 400)))), dtype=np.uint32
        )
    finite = st.floats(-6e4, 6e4, width=32, allow_nan=False, allow_infinity=False)
    vals = np.array(draw(st.lists(finite, min_size=ix.size, max_size=ix.size)), np.float32)
    return n, ix, vals.reshape(-1)


@settings(max_examples=120, deadline=None)
@given(data=sparse_vectors(), chunk=st.integers(1, 70))
def test_round_trip_every_format(data, chunk):
    n, ix, vals = data
    formats = [*INDEX, "auto"] + (["dense"] if ix.size == n else [])
    for index in formats:
        for values in VALUES:
            p = _core.compress_encode(n, ix, vals, index=index, value_format=values, chunk=chunk)
            info = _core.compress_header(p)
            chosen = info["index"]
            if index != "auto":
                assert chosen == index
            else:
                sizes = [expected_size(f, values, n, ix, chunk) for f in INDEX]
                if ix.size == n:
                    assert chosen == "dense"
                else:
                    assert p.size == min(sizes)
            assert p.size == expected_size(chosen, values, n, ix, chunk)
            assert int.from_bytes(p[-4:].tobytes(), "little") == crc32c(p[:-4].tobytes())
            got_ix, got_v, got_n = _core.compress_decode(p)
            assert got_n == n
            np.testing.assert_array_equal(got_ix, ix)
            np.testing.assert_array_equal(got_v, expected_values(values, vals, chunk))
            dense = _core.compress_decompress(p, n)
            want = np.zeros(n, np.float32)
            want[ix] = got_v
            np.testing.assert_array_equal(dense, want)


def test_header_bytes_are_as_documented():
    p = _core.compress_encode(
        1000, np.array([3, 900], np.uint32), np.array([1, -2], np.float32), index="raw"
    )
    b = p.tobytes()
    assert b[:4] == b"MoEC" and b[4] == 1 and b[5] == 2 and b[6] == 0 and b[7] == 0
    assert int.from_bytes(b[8:16], "little") == 1000
    assert int.from_bytes(b[16:24], "little") == 2
    assert int.from_bytes(b[24:32], "little") == 8
    assert b[32:40] == bytes(8)
    assert np.frombuffer(b[40:48], "<u4").tolist() == [3, 900]
    assert np.frombuffer(b[48:56], "<f4").tolist() == [1.0, -2.0]


def test_varint_is_at_most_45_percent_of_raw_at_ratio_one_percent():
    n = 10_000_000
    ix = _core.compress_select(
        np.random.default_rng(0).standard_normal(n).astype(np.float32), n // 100
    )
    vals = np.ones(ix.size, np.float32)
    var = _core.compress_header(_core.compress_encode(n, ix, vals, index="varint"))
    assert var["index_bytes"] <= 0.45 * 4 * ix.size


def test_saturation_of_half_formats():
    ix = np.array([0, 1], np.uint32)
    v = np.array([1e6, -3e38], np.float32)
    _, f16, _ = _core.compress_decode(_core.compress_encode(2, ix, v, value_format="f16"))
    np.testing.assert_array_equal(f16, [65504, -65504])
    _, b16, _ = _core.compress_decode(_core.compress_encode(2, ix, v, value_format="bf16"))
    assert np.all(np.isfinite(b16))


def test_encoder_rejects_bad_input():
    v = np.ones(2, np.float32)
    with pytest.raises(ValueError, match="strictly increasing"):
        _core.compress_encode(10, np.array([3, 3], np.uint32), v)
    with pytest.raises(ValueError, match="out of range"):
        _core.compress_encode(10, np.array([3, 10], np.uint32), v)
    with pytest.raises(ValueError, match="non-finite"):
        _core.compress_encode(10, np.array([1, 2], np.uint32), np.array([1, np.nan], np.float32))
    with pytest.raises(ValueError, match="'dense' sends every element"):
        _core.compress_encode(10, np.array([1, 2], np.uint32), v, index="dense")
    with pytest.raises(ValueError, match="chunk must be in"):
        _core.compress_encode(10, np.array([1, 2], np.uint32), v, value_format="int8", chunk=0)


# --- decoding bad payloads --------------------------------------------------------------------


def _base_payloads():
    rng = np.random.default_rng(3)
    out = []
    for n in (1, 13, 100, 777):
        ix = np.flatnonzero(rng.random(n) < 0.3).astype(np.uint32)
        vals = rng.standard_normal(ix.size).astype(np.float32)
        for index in INDEX:
            for values in VALUES:
                p = _core.compress_encode(n, ix, vals, index=index, value_format=values, chunk=5)
                out.append(p)
        out.append(_core.compress_int8(rng.standard_normal(n).astype(np.float32), chunk=16))
    return out


def _reseal(b: bytearray) -> None:
    b[-4:] = crc32c(bytes(b[:-4])).to_bytes(4, "little")


def test_each_defect_is_named():
    p = _core.compress_encode(
        300, np.array([0, 5, 200], np.uint32), np.array([1, -2, 3], np.float32), index="varint"
    )
    b = p.tobytes()
    cases = {
        "truncated": b[:20],
        "truncated: header describes 60 bytes, got 59": b[:-1],
        "oversized: 61 bytes": b + b"\x00",
        "not a moecore payload": b"GIF89a" + b[6:],
        "checksum mismatch": b[:45] + bytes([b[45] ^ 1]) + b[46:],
    }
    for what, data in cases.items():
        with pytest.raises(CorruptPayload, match=what):
            _core.compress_decode(np.frombuffer(data, np.uint8))
    version = bytearray(b)
    version[4] = 9
    with pytest.raises(CorruptPayload, match="unsupported format version 9"):
        _core.compress_decode(np.frombuffer(bytes(version), np.uint8))
    small_n = bytearray(b)
    small_n[8:16] = (150).to_bytes(8, "little")
    _reseal(small_n)
    with pytest.raises(CorruptPayload, match=r"index 200 \(entry 2\) is out of range for n = 150"):
        _core.compress_decode(np.frombuffer(bytes(small_n), np.uint8))


def test_fuzz_100k_mutated_payloads_raise_only_corrupt_payload():
    rng = np.random.default_rng(2024)
    bases = [p.tobytes() for p in _base_payloads()]
    decode = _core.compress_decode
    raw_total = resealed_total = resealed_ok = 0
    for i in range(100_000):
        base = bases[i % len(bases)]
        kind = i % 5
        b = bytearray(base)
        r = int(rng.integers(0, 1 << 62))
        if kind == 0:  # one flipped bit anywhere
            pos = r % len(b)
            b[pos] ^= 1 << (r >> 32) % 8
        elif kind == 1:  # truncated
            del b[r % len(b) :]
        elif kind == 2:  # random tail appended
            b += r.to_bytes(8, "little")[: 1 + (r >> 40) % 8]
        else:  # a header or body byte changed, checksum recomputed: content checks must hold
            pos = 4 + r % (len(b) - 8) if kind == 3 else 40 + r % max(1, len(b) - 44)
            if pos < len(b) - 4:
                b[pos] = (r >> 24) & 0xFF
            _reseal(b)
        arr = np.frombuffer(bytes(b), np.uint8)
        try:
            decode(arr)
            accepted = True
        except CorruptPayload:
            accepted = False
        if kind < 3:
            raw_total += 1
            assert not accepted, f"mutation {kind} of payload {i % len(bases)} was accepted"
        else:
            resealed_total += 1
            resealed_ok += accepted
    assert raw_total + resealed_total == 100_000
    assert 0 < resealed_ok < resealed_total  # some value edits stay valid, most do not
