"""A golden fixture for tests/suite/quant.rs: int8 and NF4 quantization written again, in numpy.

Run from the repository root (needs numpy only, whose version goes into the fixture):

    python scripts/quant_fixtures.py

It builds a (5, 3840) f32 weight from a 64-bit LCG (so that Rust makes the same one bit for
bit; outliers, scattered zeros and one all-zero block included), quantizes it as
src/nn/quant documents it, and writes tests/fixtures/quant/expected.json: for each format
the SHA-256 of the dequantized weight's little-endian f32 bytes, the absmax every block
dequantizes with, and the first 128 dequantized values, all as f32 bit patterns.

What is followed, and from where:
- int8: blocks of 64 along each row, code round(x / absmax * 127) (half away from zero),
  value code * (absmax / 127).
- NF4: the 16 values of bitsandbytes' `get_4bit_type("nf4")` (bitsandbytes/functional.py),
  nearest value to x / absmax (the lower one on a tie); double quantization as its
  `quantize_4bit(compress_statistics=True)`: absmax minus their mean, quantized in groups of
  256 blocks with `create_dynamic_map(signed=True)` (nearest value) and one absmax per group;
  value NF4[i] * (dynamic[q] * group_absmax + mean).
Two choices are this crate's, not bitsandbytes': the mean of the absmax values is taken in
f64 and rounded to f32 (torch takes it in f32), and the dynamic map is computed in f64 and
rounded to f32 (bitsandbytes builds it with torch in f32). bitsandbytes itself cannot run
here (its 4-bit quantization needs CUDA), so this fixture checks the Rust code against a
second implementation of the same documented algorithm, not against bitsandbytes' output.
"""

import hashlib
import json
import os

import numpy as np

F32 = np.float32
OUT = os.path.join("tests", "fixtures", "quant")
SHAPE = (5, 3840)
BLOCK = 64
GROUP = 256

NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=F32,
)


def weight():
    """x_i = (2 u_i - 1) * 0.05 with u_i the top 24 bits of an LCG over 2^64; every 997th value
    times 8, every 101st zero, block 5 all zero."""
    n = SHAPE[0] * SHAPE[1]
    state = 0x853C49E6748FEA9B
    out = np.empty(n, dtype=F32)
    for i in range(n):
        state = (state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        u = F32(state >> 40) / F32(1 << 24)
        x = (u * F32(2.0) - F32(1.0)) * F32(0.05)
        if i % 997 == 0:
            x = x * F32(8.0)
        if i % 101 == 0:
            x = F32(0.0)
        out[i] = x
    out[5 * BLOCK : 6 * BLOCK] = 0.0
    return out


def dynamic_map():
    data = []
    for i in range(7):
        points = 2**i + 1
        b = np.linspace(0.1, 1.0, points)
        means = (b[:-1] + b[1:]) / 2.0
        data += list(10.0 ** (i - 6) * means)
        data += list(-(10.0 ** (i - 6)) * means)
    data += [0.0, 1.0]
    assert len(data) == 256
    return np.array(sorted(data), dtype=np.float64).astype(F32)


def nearest(table, v):
    return int(np.argmin(np.abs(v - table)))


def block_absmax(x):
    return np.abs(x.reshape(-1, BLOCK)).max(axis=1).astype(F32)


def int8(x):
    a = block_absmax(x)
    blocks = x.reshape(-1, BLOCK)
    out = np.empty_like(blocks)
    for b in range(len(a)):
        if a[b] > 0:
            q = blocks[b] / a[b] * F32(127.0)
            # Half away from zero, exactly: |q| - floor(|q|) is exact in f32.
            r = np.floor(np.abs(q))
            r = r + (np.abs(q) - r >= F32(0.5))
            # + 0 turns −0 into 0: a code is an integer, with no sign of zero.
            code = np.clip(np.sign(q) * r, -127, 127) + F32(0.0)
        else:
            code = np.zeros(BLOCK, dtype=F32)
        out[b] = code.astype(F32) * (a[b] / F32(127.0))
    return out.reshape(-1), a


def nf4(x):
    a = block_absmax(x)
    blocks = x.reshape(-1, BLOCK)
    idx = np.empty(blocks.shape, dtype=np.int64)
    for b in range(len(a)):
        for j in range(BLOCK):
            idx[b, j] = nearest(NF4, blocks[b, j] / a[b]) if a[b] > 0 else 7
    packed = (idx[:, 0::2] << 4) | idx[:, 1::2]
    assert packed.max() < 256
    offset = F32(np.mean(a.astype(np.float64)))
    code = dynamic_map()
    a_hat = np.empty_like(a)
    for g in range(0, len(a), GROUP):
        centred = (a[g : g + GROUP] - offset).astype(F32)
        s = F32(np.abs(centred).max())
        for j, c in enumerate(centred):
            q = nearest(code, c / s if s > 0 else F32(0.0))
            a_hat[g + j] = code[q] * s + offset
    out = NF4[idx] * a_hat[:, None]
    return out.astype(F32).reshape(-1), a_hat


def bits(v):
    return [int(b) for b in np.asarray(v, dtype=F32).view(np.uint32)]


def main():
    x = weight()
    result = {"numpy": np.__version__, "shape": list(SHAPE)}
    for name, f in [("int8", int8), ("nf4", nf4)]:
        deq, absmax = f(x)
        result[name] = {
            "sha256": hashlib.sha256(deq.astype("<f4").tobytes()).hexdigest(),
            "block_absmax": bits(absmax),
            "first_values": bits(deq[:128]),
        }
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(result, f)
        f.write("\n")


if __name__ == "__main__":
    main()
