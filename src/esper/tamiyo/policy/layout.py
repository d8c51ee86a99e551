"""The padded head layout `[B, T, H, A_max]` and the constant tables that serve it.

Every bundle's hook returns the logits of all heads in one tensor of shape
`[B, T, H, A_max]`: head `h` occupies `[..., h, :A_h]` and the columns past `A_h`
are padding. One layout for all heads is what lets the base mask, sample, score
and measure entropy of all eight heads with one kernel launch each.

`HeadLayout` precomputes, once per bundle, the small index and fill tensors that
map between per-head tensors and that layout, so no per-call work rebuilds them.
"""

from __future__ import annotations

import math
from typing import Final

import torch

from esper.tamiyo.policy.action_space import HEAD_NAMES, ActionSpace
from esper.tamiyo.policy.masks import ActionMasks

__all__ = ["MASKED_LOGIT", "PADDING_LOGIT", "HeadLayout"]

MASKED_LOGIT: Final = -1e4
"""Logit given to an invalid action: exp() of it underflows to exactly 0 in fp32, and
it stays finite in fp16 and bf16, where -inf would turn into NaN in softmax backward."""

PADDING_LOGIT: Final = -3e4
"""Logit given to a padding column, below `MASKED_LOGIT`, so that even with value
checks off a head whose every action is masked samples one of its own actions,
never a padding column."""

_PADDING_CACHE_SIZE = 16  # distinct batch shapes whose padding column `HeadLayout` keeps


class HeadLayout:
    """Index and fill tables for one `ActionSpace` on one device.

    Args:
        action_space: Head sizes.
        device: Where the tables live; move them with `to()`.

    Attributes:
        action_space: The head sizes the tables were built for.
        num_heads: `H`.
        padded_size: `A_max`.
        sizes: `[H]` int64, each head's number of actions.
        structural_valid: `[H, A_max]` bool, True on each head's own columns.
        fill: `[H, A_max]` float32, `MASKED_LOGIT` on head columns and `PADDING_LOGIT`
            on padding columns: what masked positions of the logits become.
        minus_inf: 0-dim float32 `-inf`, for `categorical.mask_logits`.
        inv_log_count: `[A_max + 1]` float32, `1 / log(n)` for `n >= 2` valid actions
            and 0 for `n <= 1`, indexed by the number of valid actions: normalizes
            entropy to [0, 1] with a lookup instead of a log and a division per call.
    """

    def __init__(self, action_space: ActionSpace, device: torch.device | None = None) -> None:
        self.action_space = action_space
        self.num_heads = action_space.num_heads
        self.padded_size = action_space.padded_size
        sizes = action_space.sizes
        width = self.padded_size

        structural = torch.zeros(self.num_heads, width, dtype=torch.bool)
        # A mask pack is `cat(per-head masks + [False column])` gathered by `pack_index`:
        # column `offset_h + a` for action `a` of head `h`, the trailing False column
        # for padding.
        total = sum(sizes)
        pack_index = torch.full((self.num_heads, width), total, dtype=torch.long)
        offset = 0
        for head, size in enumerate(sizes):
            structural[head, :size] = True
            pack_index[head, :size] = torch.arange(offset, offset + size)
            offset += size

        inv_log = torch.zeros(width + 1, dtype=torch.float32)
        for count in range(2, width + 1):
            inv_log[count] = 1.0 / math.log(count)

        self.sizes = torch.tensor(sizes, dtype=torch.long)
        self.structural_valid = structural
        self.fill = torch.where(
            structural, torch.tensor(MASKED_LOGIT), torch.tensor(PADDING_LOGIT)
        ).float()
        self.inv_log_count = inv_log
        self._pack_index = pack_index.flatten()
        self.minus_inf = torch.tensor(-math.inf)
        self._false_column = torch.zeros(1, dtype=torch.bool)
        self._padding_columns: dict[tuple[int, ...], torch.Tensor] = {}
        true_rows: list[torch.Tensor] = []
        for size in sizes:
            true_rows.append(torch.ones(size, dtype=torch.bool))
        self._true_rows = tuple(true_rows)
        self._head_sizes = sizes
        if device is not None:
            self.to(device)

    def to(self, device: torch.device) -> HeadLayout:
        """Move every table to `device` in place and return `self`."""
        self.sizes = self.sizes.to(device)
        self.structural_valid = self.structural_valid.to(device)
        self.fill = self.fill.to(device)
        self.inv_log_count = self.inv_log_count.to(device)
        self._pack_index = self._pack_index.to(device)
        self.minus_inf = self.minus_inf.to(device)
        self._false_column = self._false_column.to(device)
        self._padding_columns = {}
        moved: list[torch.Tensor] = []
        for row in self._true_rows:
            moved.append(row.to(device))
        self._true_rows = tuple(moved)
        return self

    def all_valid(self, batch: int, steps: int) -> torch.Tensor:
        """`[B, T, H, A_max]` validity when nothing is masked (a view, no copy)."""
        return self.structural_valid.expand(batch, steps, self.num_heads, self.padded_size)

    def pack_masks(self, masks: ActionMasks, batch: int, steps: int) -> torch.Tensor:
        """Pack per-head masks into the padded layout with one `cat` and one gather.

        When every mask is `[B, A_h]` (a rollout step) they are packed as they are;
        otherwise as `[B, T, A_h]`, unsqueezing any `[B, A_h]` mask given beside
        `[B, 1, A_h]` ones.

        Args:
            masks: Checked masks, each `[B, A_h]` (only when `T == 1`), `[B, 1, A_h]` or
                `[B, T, A_h]`, or `None` for an all-valid head.
            batch: `B`.
            steps: `T`.

        Returns:
            `[B, T, H, A_max]` bool, True where the action is valid; padding is False.
        """
        given: list[torch.Tensor | None] = []
        flat = steps == 1  # pack [B, A_h] masks as they are, with no reshape each
        for name in HEAD_NAMES:
            mask = getattr(masks, name)
            given.append(mask)
            flat = flat and (mask is None or mask.dim() == 2)
        columns: list[torch.Tensor] = []
        lead = (batch, -1) if flat else (batch, steps, -1)
        for head, mask in enumerate(given):
            if mask is None:
                columns.append(self._true_rows[head].expand(*lead))
            elif not flat and mask.dim() == 2:
                columns.append(mask.unsqueeze(1))  # [B, 1, A_h]: [B, A_h] beside [B, 1, A_h]
            else:
                columns.append(mask)
        columns.append(self._padding_column(lead))
        packed = torch.cat(columns, dim=-1)  # [B, (T,) sum A_h + 1]
        return packed.index_select(-1, self._pack_index).view(
            batch, steps, self.num_heads, self.padded_size
        )  # [B, T, H, A_max]

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

    def split_heads(self, padded: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-head views of a padded tensor, without the padding.

        Args:
            padded: `[..., H, A_max]`.

        Returns:
            Head name to a `[..., A_h]` view.
        """
        out: dict[str, torch.Tensor] = {}
        rows = padded.unbind(-2)
        for head, name in enumerate(HEAD_NAMES):
            out[name] = rows[head][..., : self._head_sizes[head]]
        return out


def per_head(packed: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split a `[..., H]` tensor into a dict of `[...]` views, one per head."""
    return dict(zip(HEAD_NAMES, packed.unbind(-1), strict=True))
