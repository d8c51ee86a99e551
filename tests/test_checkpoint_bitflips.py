"""Any single bit flipped in a checkpoint: it loads exactly as saved, or is refused by name.

`benchmarks/checkpoint_bitflips.py` flips many more (every bit, if asked) and prints
what each did; this keeps a few hundred in the suite, half of them in the zip's
structure (headers and central directory), where the CRC checks do not reach.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.tamiyo.policy import LSTMPolicyBundle, PolicyBundle, load_policy, save_policy
from esper.tamiyo.policy.checkpoint import CheckpointError


@dataclass(frozen=True)
class Saved:
    """A small checkpoint: the bundle, its file, its bytes, the bits outside record data."""

    bundle: PolicyBundle
    path: Path
    original: bytes
    structure_bits: list[int]


def _record_data(path: Path) -> set[int]:
    """Offsets of the bytes that are records' data (what the CRC-32s cover)."""
    offsets: set[int] = set()
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            at = info.header_offset
            name = int.from_bytes(data[at + 26 : at + 28], "little")
            extra = int.from_bytes(data[at + 28 : at + 30], "little")
            start = at + 30 + name + extra
            offsets.update(range(start, start + info.compress_size))
    return offsets


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    bundle = LSTMPolicyBundle(6, hidden_dim=8, embed_dim=6)
    path = save_policy(bundle, tmp_path_factory.mktemp("bitflips") / "policy.pt")
    original = path.read_bytes()
    data = _record_data(path)
    structure = [bit for bit in range(len(original) * 8) if bit // 8 not in data]
    return Saved(bundle, path, original, structure)


def _loads_as_saved_or_is_refused_by_name(saved: Saved, bit: int) -> None:
    damaged = bytearray(saved.original)
    damaged[bit // 8] ^= 1 << (bit % 8)
    saved.path.write_bytes(bytes(damaged))
    try:
        loaded = load_policy(saved.path)
    except CheckpointError as error:
        message = str(error)
    else:
        assert type(loaded) is type(saved.bundle)
        assert loaded.config == saved.bundle.config
        got, want = loaded.state_dict(), saved.bundle.state_dict()
        assert list(got) == list(want)
        for key, value in want.items():
            if isinstance(value, torch.Tensor):
                assert got[key].dtype == value.dtype, key
                assert torch.equal(got[key], value), key
            else:
                assert got[key] == value, key
        return
    assert str(saved.path) in message


# A draw from a wide range, taken modulo the number of bits: 150 distinct bits, spread
# over the file (a narrow range would favour its first bytes).
DRAWS = st.integers(0, 2**32 - 1)


@settings(max_examples=150)
@given(draw=DRAWS)
def test_a_flip_anywhere_loads_as_saved_or_is_refused_by_name(saved: Saved, draw: int) -> None:
    _loads_as_saved_or_is_refused_by_name(saved, draw % (len(saved.original) * 8))


@settings(max_examples=150)
@given(draw=DRAWS)
def test_a_flip_in_the_zip_structure_loads_as_saved_or_is_refused_by_name(
    saved: Saved, draw: int
) -> None:
    bits = saved.structure_bits
    _loads_as_saved_or_is_refused_by_name(saved, bits[draw % len(bits)])
