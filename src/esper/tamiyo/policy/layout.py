"""The padded head layout `[B, T, H, A_max]` and the constant tables that serve it.

Every bundle's hook returns the logits of all heads in one tensor of shape
`[B, T, H, A_max]`: head `h` occupies `[..., h, :A_h]` and the columns past `A_h`
are padding. One layout for all heads is what lets the base mask, sample, score
and measure entropy of all eight heads with one kernel launch each.

`HeadLayout` precomputes, once per bundle and device, the small index and fill tensors that
map between per-head tensors and that layout, so no per-call work rebuilds them. For a
hierarchical space it also holds the hierarchy as tensors: which heads each op uses
(`relevance`) and the canonical action of each head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import torch

from esper.tamiyo.policy.action_space import HEAD_NAMES, PRIMARY_HEAD, ActionSpace

__all__ = [
    "BROKEN_LOGIT",
    "MASKED_LOGIT",
    "PADDING_LOGIT",
    "PRIMARY",
    "HeadLayout",
    "at_op",
    "per_head",
    "split_heads",
]

MASKED_LOGIT: Final = -1e4
"""Logit given to an invalid action: exp() of it underflows to exactly 0 in fp32, and
it stays finite in fp16 and bf16, where -inf would turn into NaN in softmax backward."""

BROKEN_LOGIT: Final = -5e3
"""Logit given, after the shift, to a valid action whose logit is NaN or Inf (a broken
network): above `MASKED_LOGIT`, so whatever the network produced a masked action is
never chosen over a valid one; a row whose every valid logit is broken samples its
valid actions uniformly."""

PADDING_LOGIT: Final = -3e4
"""Logit given to a padding column, below `MASKED_LOGIT`, so that even with value
checks off a head whose every action is masked samples one of its own actions,
never a padding column."""

_PADDING_CACHE_SIZE = 16  # distinct batch shapes whose padding column `HeadLayout` keeps

PRIMARY: Final = HEAD_NAMES.index(PRIMARY_HEAD)
"""Index of the `op` head in `HEAD_NAMES` and in every packed tensor."""


class HeadLayout:
    """Index and fill tables for one `ActionSpace` on one device.

    Args:
        action_space: Head sizes.
        device: Where the tables live.

    Attributes:
        action_space: The head sizes the tables were built for.
        device: Where the tables live.
        num_heads: `H`.
        padded_size: `A_max`.
        head_sizes: Each head's number of actions, `A_h`, in `HEAD_NAMES` order.
        action_counts: `[H]` int64, `head_sizes` as a tensor, for range checks.
        structural_valid: `[H, A_max]` bool, True on each head's own columns.
        fill: `[H, A_max]` float32, `MASKED_LOGIT` on head columns and `PADDING_LOGIT`
            on padding columns: what masked positions of the logits become.
        minus_inf: 0-dim float32 `-inf`, for `categorical.mask_logits`.
        inv_log_count: `[A_max + 1]` float32, `1 / log(n)` for `n >= 2` valid actions
            and 0 for `n <= 1`, indexed by the number of valid actions: normalizes
            entropy to [0, 1] with a lookup instead of a log and a division per call.
        hierarchical: The space has an `ActionHierarchy`; the three tables below are
            `None` when it has not.
        relevance: `[N_op, H]` bool, True where op `n` uses head `h` (`op` always).
        canonical: `[H]` int64, each head's canonical action.
        primary_row: `[H, 1]` bool, True on the `op` row, to take the op's logits from
            the flat logits when a hook gives per-op logits.
        other_heads_used: `[N_op, H]` float32, `relevance` without the `op` column:
            weighs each head's conditional entropy in the joint entropy.
        every_head: `[H]` bool, all True: a flat space's relevance and availability.
    """

    def __init__(self, action_space: ActionSpace, device: torch.device) -> None:
        self.action_space = action_space
        self.device = device
        self.num_heads = action_space.num_heads
        self.padded_size = action_space.padded_size
        sizes = self.head_sizes = action_space.sizes
        width = self.padded_size

        structural = torch.zeros(self.num_heads, width, dtype=torch.bool)
        # A mask pack is `cat(per-head masks + [False column])` gathered by `pack_index`:
        # column `offset_h + a` for action `a` of head `h`, the trailing False column
        # for padding.
        pack_index = torch.full((self.num_heads, width), sum(sizes), dtype=torch.long)
        offset = 0
        for head, size in enumerate(sizes):
            structural[head, :size] = True
            pack_index[head, :size] = torch.arange(offset, offset + size)
            offset += size
        inv_log = [0.0, 0.0] + [1.0 / math.log(n) for n in range(2, width + 1)]

        # float32 whatever torch's default dtype is when a device's tables are first built.
        self.action_counts = torch.tensor(sizes, dtype=torch.long, device=device)
        self.structural_valid = structural.to(device)
        self.fill = torch.where(
            structural,
            torch.tensor(MASKED_LOGIT, dtype=torch.float32),
            torch.tensor(PADDING_LOGIT, dtype=torch.float32),
        ).to(device)
        self.inv_log_count = torch.tensor(inv_log, dtype=torch.float32, device=device)
        self.minus_inf = torch.tensor(-math.inf, dtype=torch.float32, device=device)
        self._pack_index = pack_index.flatten().to(device)
        self._false_column = torch.zeros(1, dtype=torch.bool, device=device)
        self._true_rows = tuple(torch.ones(size, dtype=torch.bool, device=device) for size in sizes)
        self._padding_columns: dict[tuple[int, ...], torch.Tensor] = {}
        table = action_space.hierarchy
        self.hierarchical = table is not None
        self.num_ops = sizes[PRIMARY]
        self.relevance: torch.Tensor | None = None
        self.canonical: torch.Tensor | None = None
        self.primary_row: torch.Tensor | None = None
        self.other_heads_used: torch.Tensor | None = None
        self.every_head = torch.ones(self.num_heads, dtype=torch.bool, device=device)
        if table is not None:
            relevance = torch.tensor(table.relevance_table())  # [N_op, H]
            primary = torch.arange(self.num_heads) == PRIMARY  # [H]
            self.relevance = relevance.to(device)
            self.canonical = torch.tensor(table.canonical, dtype=torch.long, device=device)
            self.primary_row = primary.view(-1, 1).to(device)
            self.other_heads_used = (relevance & ~primary).float().to(device)

    def all_valid(self, batch: int, steps: int) -> torch.Tensor:
        """`[B, T, H, A_max]` validity when nothing is masked (a view, no copy)."""
        return self.structural_valid.expand(batch, steps, self.num_heads, self.padded_size)

    def pack_masks(
        self, masks: Sequence[torch.Tensor | None], batch: int, steps: int
    ) -> torch.Tensor:
        """Pack per-head masks into the padded layout with one `cat` and one gather.

        When every mask is `[B, A_h]` (a rollout step) they are packed as they are;
        otherwise as `[B, T, A_h]`, unsqueezing any `[B, A_h]` mask given beside
        `[B, 1, A_h]` ones.

        Args:
            masks: Checked masks in `HEAD_NAMES` order (`ActionMasks.as_tuple()`), each
                `[B, A_h]` (only when `T == 1`), `[B, 1, A_h]` or `[B, T, A_h]`, or `None`
                for an all-valid head.
            batch: `B`.
            steps: `T`.

        Returns:
            `[B, T, H, A_max]` bool, True where the action is valid; padding is False.
        """
        flat = steps == 1  # pack `[B, A_h]` masks as they are, with no reshape each
        for mask in masks:
            if mask is not None and mask.dim() != 2:
                flat = False
                break
        lead = (batch, -1) if flat else (batch, steps, -1)
        columns: list[torch.Tensor] = []
        for head, mask in enumerate(masks):
            if mask is None:
                columns.append(self._true_rows[head].expand(*lead))
            elif not flat and mask.dim() == 2:
                columns.append(mask.unsqueeze(1))  # [B, 1, A_h]: beside [B, 1, A_h] ones
            else:
                columns.append(mask)
        columns.append(self._padding_column(lead))
        packed = torch.cat(columns, dim=-1)  # [B, (T,) sum A_h + 1]
        return packed.index_select(-1, self._pack_index).view(
            batch, steps, self.num_heads, self.padded_size
        )  # [B, T, H, A_max]

    def pack_by_op(self, masks: Sequence[torch.Tensor | None], valid: torch.Tensor) -> torch.Tensor:
        """Pack per-op masks like `pack_masks`, ANDed with the flat masks already packed.

        Args:
            masks: Checked per-op masks of the heads other than `op`, in `HEAD_NAMES`
                order (`ActionMasks.by_op_tuple()`), each `[B, N_op, A_h]` (only when
                `T == 1`) or `[B, T, N_op, A_h]`, or `None` where a head has none.
            valid: `[B, T, H, A_max]`, the packed flat masks.

        Returns:
            `[B, T, N_op, H, A_max]` bool: True where an action is valid when op `n` is
            chosen. The `op` row of every `n` is the flat op mask.
        """
        batch, steps = valid.shape[0], valid.shape[1]
        ops = self.num_ops
        flat = steps == 1  # [B, N_op, A_h] masks as they are
        for mask in masks:
            if mask is not None and mask.dim() != 3:
                flat = False
                break
        lead = (batch, ops, -1) if flat else (batch, steps, ops, -1)
        rows = iter(masks)
        columns: list[torch.Tensor] = []
        for head in range(self.num_heads):
            mask = None if head == PRIMARY else next(rows)
            if mask is None:
                columns.append(self._true_rows[head].expand(*lead))
            elif not flat and mask.dim() == 3:
                columns.append(mask.unsqueeze(1))  # [B, 1, N_op, A_h]
            else:
                columns.append(mask)
        columns.append(self._padding_column(lead))
        packed = torch.cat(columns, dim=-1).index_select(-1, self._pack_index)
        by_op = packed.view(batch, steps, ops, self.num_heads, self.padded_size)
        return by_op & valid.unsqueeze(2)  # [B, T, N_op, H, A_max]

    def _padding_column(self, lead: tuple[int, ...]) -> torch.Tensor:
        """The all-False column the pack gathers padding from, `[*lead, 1]`; cached.

        A rollout asks for the same shape on every step: an expanded view costs a tensor
        op, a lookup does not.
        """
        column = self._padding_columns.get(lead)
        if column is None:
            if len(self._padding_columns) >= _PADDING_CACHE_SIZE:
                self._padding_columns.clear()
            column = self._padding_columns[lead] = self._false_column.expand(*lead)
        return column


def at_op(by_op: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
    """Each row's slice of a per-op tensor at its op: what the chosen op conditions.

    The one place where the hierarchy's per-op masks and logits meet the op, for
    `get_action` (the sampled op) and `evaluate_actions` (the stored one) alike.

    Args:
        by_op: `[B, T, N_op, H, A_max]`.
        op: `[B, T]` int64 ops.

    Returns:
        `[B, T, H, A_max]`.
    """
    batch, steps, _, heads, width = by_op.shape
    index = op.view(batch, steps, 1, 1, 1).expand(batch, steps, 1, heads, width)
    return by_op.gather(2, index).squeeze(2)


def split_heads(padded: torch.Tensor, sizes: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Per-head views of a padded tensor, without the padding.

    Args:
        padded: `[..., H, A_max]`.
        sizes: Each head's number of actions, `A_h`, in `HEAD_NAMES` order.

    Returns:
        Head name to a `[..., A_h]` view.
    """
    rows = padded.unbind(-2)
    return {name: rows[head][..., : sizes[head]] for head, name in enumerate(HEAD_NAMES)}


def per_head(packed: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split a `[..., H]` tensor into a dict of `[...]` views, one per head."""
    return dict(zip(HEAD_NAMES, packed.unbind(-1), strict=True))
