"""Per-head probability floors: the setting, its checks, and its tables on a device.

A head that is rarely relevant can collapse: its entropy goes to zero while nothing
trains it, and when it matters again the policy no longer explores it. A floor `f` on
a head keeps every valid action of that head at probability `f` or more, by mixing
the policy with the uniform distribution over the valid actions:

    p'(a) = (1 - n f) p(a) + f        for each of the n valid actions,

with `f` lowered to `0.99 / n` where it would pass it, so the policy keeps at least
1% of its own say. Masked actions keep probability 0, each row still sums to 1, the
order of the actions is unchanged (so is the mode), and the gradient reaches every
valid logit, scaled by `1 - n f`. A head with one valid action (canonical or forced) is
left as it is: log-probability 0, entropy 0.

The base applies the floors once, in float32, through
`categorical.floor_log_probs`, for `get_action` (both stages of a hierarchy),
`evaluate_actions` and `forward`: a rollout and the update that scores the same
action under the same masks read one function, so the two legs of the PPO ratio
agree to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch

from esper.tamiyo.policy.action_space import HEAD_NAMES, ActionSpace
from esper.tamiyo.policy.layout import PRIMARY

__all__ = ["MAX_SHARE", "FloorTable", "FloorTables", "check_probability_floor"]

MAX_SHARE = 0.99
"""The most of a row the floors may take: `f` is lowered to `MAX_SHARE / n`."""


def check_probability_floor(value: object, owner: str) -> dict[str, float]:
    """Check a `probability_floor` setting and return it as a plain dict.

    Args:
        value: `None` (no floors), or a mapping of head name to a float in [0, 1).
        owner: The class whose setting it is, for the messages.

    Returns:
        Head name to floor, in `HEAD_NAMES` order; only the heads given.

    Raises:
        TypeError: `value` is not a mapping, or a floor is not a float (a bool or an
            int is refused: write `0.1`, not `1` or `True`).
        ValueError: An unknown head (or a key that is not a head name at all), or a
            floor outside [0, 1) or not finite.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{owner}: probability_floor must be a mapping of head name to float, such as "
            f"{{'op': 0.15}}, or None; got {type(value).__name__}"
        )
    for head, floor in value.items():
        if not isinstance(head, str) or head not in HEAD_NAMES:
            raise ValueError(
                f"{owner}: probability_floor has an unknown head {head!r}; the heads are "
                f"{', '.join(HEAD_NAMES)}"
            )
        if not isinstance(floor, float):
            raise TypeError(
                f"{owner}: probability_floor[{head!r}] must be a float in [0, 1), got "
                f"{type(floor).__name__} ({floor!r})"
            )
        if not (math.isfinite(floor) and 0.0 <= floor < 1.0):
            raise ValueError(
                f"{owner}: probability_floor[{head!r}] must lie in [0, 1), got {floor!r}"
            )
    return {head: float(value[head]) for head in HEAD_NAMES if head in value}


class FloorTable(NamedTuple):
    """What `categorical.floor_log_probs` needs for some heads, on one device.

    For head `h` of the table with `n` valid actions and floor `f = min(floor_h, 0.99 /
    n)`: `p' = (1 - n f) p + f`, computed in log space as `logaddexp(log p + log(1 - n
    f), log f)`. Where no floor applies (floor 0, or `n <= 1`) the pair is `(0, -inf)`,
    which leaves `log p` exactly as it is.

    Attributes:
        log_scale: `[H * (A_max + 1)]` float32, entry `h * (A_max + 1) + n` is
            `log(1 - n f)`.
        log_floor: Laid out alike, `log f`.
        offsets: `[H, 1]` int64, `h * (A_max + 1)`: a head's first entry.
    """

    log_scale: torch.Tensor
    log_floor: torch.Tensor
    offsets: torch.Tensor


def _table(floors: tuple[float, ...], padded_size: int, device: torch.device) -> FloorTable:
    scales: list[float] = []
    lows: list[float] = []
    for floor in floors:
        for count in range(padded_size + 1):
            if floor <= 0.0 or count <= 1:
                scales.append(0.0)
                lows.append(-math.inf)
                continue
            effective = min(floor, MAX_SHARE / count)
            scales.append(math.log1p(-count * effective))
            lows.append(math.log(effective))
    offsets = torch.arange(len(floors), dtype=torch.long, device=device) * (padded_size + 1)
    return FloorTable(
        torch.tensor(scales, dtype=torch.float32, device=device),
        torch.tensor(lows, dtype=torch.float32, device=device),
        offsets.unsqueeze(-1),
    )


class FloorTables(NamedTuple):
    """A bundle's floors on one device: every head's table, and the op head's alone.

    Attributes:
        heads: For all `H` heads, `[B, T, H, A_max]` log-probabilities.
        op: For the op head alone, the first stage of a hierarchical `get_action`
            (`[B, T, 1, A_max]`); `None` when the op has no floor or the space is flat.
    """

    heads: FloorTable
    op: FloorTable | None

    @classmethod
    def build(
        cls, floors: Mapping[str, float], action_space: ActionSpace, device: torch.device
    ) -> FloorTables | None:
        """The tables for `floors` (as `check_probability_floor` returns them), or `None`.

        `None` when no head has a floor above 0: the compute paths then skip flooring
        altogether, and a step costs what it did before floors existed.
        """
        per_head = tuple(floors.get(head, 0.0) for head in HEAD_NAMES)
        if not any(floor > 0.0 for floor in per_head):
            return None
        padded = action_space.padded_size
        op_floor = per_head[PRIMARY]
        hierarchical = action_space.hierarchy is not None
        op = _table((op_floor,), padded, device) if hierarchical and op_floor > 0.0 else None
        return cls(_table(per_head, padded, device), op)
