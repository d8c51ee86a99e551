"""Flip bits of a saved checkpoint, one at a time, and count what `load_policy` does.

Every flip must end one of two ways: the bundle loads with exactly the content that
was saved (a flip in bytes nothing reads), or `load_policy` raises `CheckpointError`
with the file's name in its message. Anything else is a failure: a bundle that loads
with other weights, config or class (silent corruption), another exception, or a
`CheckpointError` that does not name the file.

The checkpoint is a small `LSTMPolicyBundle`'s, so that its zip structure (headers, the
central directory) is a fair share of its bytes; flips are counted apart by where they
land: in a record's data, or in the zip structure around the records.

Run it with `.venv/bin/python benchmarks/checkpoint_bitflips.py` (5,000 random flips),
`--flips N`, or `--every-bit` (every bit of the file, a few minutes). It exits 1 when
any flip fails. `PYTHONPATH=<an older checkout>/src` runs it against older code.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import torch

from esper.tamiyo.policy import LSTMPolicyBundle, PolicyBundle, load_policy, save_policy
from esper.tamiyo.policy.checkpoint import CheckpointError

FAILURES = ("LOADED DIFFERENT CONTENT", "CheckpointError without the file name", "raised ")


def data_bytes(path: Path) -> set[int]:
    """Offsets of the bytes that are a record's data; the rest is zip structure."""
    offsets: set[int] = set()
    with zipfile.ZipFile(path) as archive, path.open("rb") as stream:
        for info in archive.infolist():
            stream.seek(info.header_offset + 26)
            name_length, extra_length = (
                int.from_bytes(stream.read(2), "little"),
                int.from_bytes(stream.read(2), "little"),
            )
            start = info.header_offset + 30 + name_length + extra_length
            offsets.update(range(start, start + info.compress_size))
    return offsets


def same_content(loaded: PolicyBundle, saved: PolicyBundle) -> bool:
    """Same class, config and `state_dict`: tensors equal in dtype, shape and values."""
    if type(loaded) is not type(saved) or loaded.config != saved.config:
        return False
    got, want = loaded.state_dict(), saved.state_dict()
    if list(got) != list(want):
        return False
    for key, value in want.items():
        other = got[key]
        if isinstance(value, torch.Tensor):
            if not (
                isinstance(other, torch.Tensor)
                and other.dtype == value.dtype
                and torch.equal(other, value)
            ):
                return False
        elif other != value:
            return False
    return True


def outcome(path: Path, saved: PolicyBundle) -> str:
    """What loading the file at `path` did, as a row label of the table."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = load_policy(path)
    except CheckpointError as error:
        message = str(error)
        if str(path) not in message:
            return "CheckpointError without the file name"
        return f"refused: {_reason(message)}"
    except Exception as error:  # any other exception is what is counted
        return f"raised {type(error).__name__}"
    return "loaded the saved content" if same_content(loaded, saved) else FAILURES[0]


def _reason(message: str) -> str:
    """A short name for why a `CheckpointError` refused the file."""
    for needle, reason in (
        ("checksum of its record", "a zip checksum (CRC-32)"),
        ("digest", "the SHA-256 digest"),
        (
            "truncated or corrupt",
            "unreadable: " + message.split("corrupt (", 1)[-1].split(":", 1)[0],
        ),
        ("not a policy checkpoint", "not a policy checkpoint"),
    ):
        if needle in message:
            return reason
    return "other: " + message.split(": ", 1)[-1][:50]


def run(flips: list[int], size: int) -> int:
    """Flip each bit of `flips` in a fresh copy; print the table; the number of failures."""
    saved = LSTMPolicyBundle(6, hidden_dim=8, embed_dim=6)
    counts: Counter[tuple[str, str]] = Counter()
    with tempfile.TemporaryDirectory() as folder:
        path = save_policy(saved, Path(folder) / "policy.pt")
        original = path.read_bytes()
        data = data_bytes(path)
        started = time.perf_counter()
        for bit in flips:
            damaged = bytearray(original)
            damaged[bit // 8] ^= 1 << (bit % 8)
            path.write_bytes(damaged)
            where = "record data" if bit // 8 in data else "zip structure"
            counts[outcome(path, saved), where] += 1
        seconds = time.perf_counter() - started
    print(
        f"{len(flips)} single-bit flips of a {size:,}-byte checkpoint "
        f"({len(data):,} bytes of record data), {seconds:.0f} s, torch {torch.__version__}\n"
    )
    rows = sorted({label for label, _ in counts}, key=lambda label: -sum(
        counts[label, where] for where in ("record data", "zip structure")
    ))  # fmt: skip
    width = max(len("outcome"), *(len(label) for label in rows))
    print(f"| {'outcome':<{width}} | record data | zip structure | total |")
    print(f"|{'-' * (width + 2)}|------------:|--------------:|------:|")
    for label in rows:
        a, b = counts[label, "record data"], counts[label, "zip structure"]
        print(f"| {label:<{width}} | {a:>11} | {b:>13} | {a + b:>5} |")
    failed = sum(n for (label, _), n in counts.items() if label.startswith(FAILURES))
    print(f"\n{failed} flip(s) neither loaded the saved content nor raised a named CheckpointError")
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--flips", type=int, default=5000, help="random flips (default 5000)")
    parser.add_argument("--every-bit", action="store_true", help="flip every bit of the file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random flips")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        size = save_policy(LSTMPolicyBundle(6, hidden_dim=8, embed_dim=6), Path(folder) / "p.pt")
        size_bytes = size.stat().st_size
    bits = range(size_bytes * 8)
    flips = list(bits) if args.every_bit else random.Random(args.seed).sample(bits, args.flips)
    return 1 if run(flips, size_bytes) else 0


if __name__ == "__main__":
    sys.exit(main())
