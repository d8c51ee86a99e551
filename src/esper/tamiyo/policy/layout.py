"""The padded head layout `[B, T, H, A_max]` and the constant tables that serve it.

Every bundle's hook returns the logits of all heads in one tensor of shape
`[B, T, H, A_max]`: head `h` occupies `[..., h, :A_h]` and the columns past `A_h`
are padding. One layout for all heads is what lets the base mask, sample, score
and measure entropy of all eight heads with one kernel launch each.

`HeadLayout` precomputes, once per bundle and device, the small index and fill tensors that
map between per-head tensors and that layout, so no per-call work rebuilds them.

For a hierarchical space it also holds the hierarchy's rule, `valid_at_op`: given an
op, a head the op uses may take what its flat mask AND its per-op mask at that op
allow, and a head the op ignores only its canonical action. A head the op ignores is
thus a head with one valid action, so sampling takes its canonical action, and its
log-probability, entropy and gradient come out exactly 0 with no step of their own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import torch

from esper.tamiyo.policy.action_space import (
    CONDITIONED_HEADS,
    HEAD_NAMES,
    PRIMARY_HEAD,
    ActionSpace,
)

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

_CONDITIONED: Final = tuple(HEAD_NAMES.index(head) for head in CONDITIONED_HEADS)


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
        conditioned_valid: `structural_valid` without the `op` row: the columns of
            per-op logits the base reads.
        fill: `[H, A_max]` float32, `MASKED_LOGIT` on head columns and `PADDING_LOGIT`
            on padding columns: what masked positions of the logits become.
        minus_inf: 0-dim float32 `-inf`, for `categorical.mask_logits`.
        inv_log_count: `[A_max + 1]` float32, `1 / log(n)` for `n >= 2` valid actions
            and 0 for `n <= 1`, indexed by the number of valid actions: normalizes
            entropy to [0, 1] with a lookup instead of a log and a division per call.
        hierarchical: The space has an `ActionHierarchy`; the tables below are
            `None` when it has not.
        num_ops: `N_op`, the op head's size.
        relevance: `[N_op, H]` bool, True where op `n` uses head `h` (`op` always).
        primary_row: `[H, 1]` bool, True on the `op` row, to take the op's logits from
            the flat logits when a hook gives per-op logits.
        other_heads: `[H]` float32, 1 but on the `op` row: sums the conditional
            entropies of the heads other than the op.
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
        conditioned = structural.clone()
        conditioned[PRIMARY] = False
        self.conditioned_valid = conditioned.to(device)
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
        self.primary_row: torch.Tensor | None = None
        self.other_heads: torch.Tensor | None = None
        self._used: torch.Tensor | None = None
        self._canonical_only: torch.Tensor | None = None
        if table is not None:
            relevance = torch.tensor(table.relevance_table())  # [N_op, H]
            primary = torch.arange(self.num_heads) == PRIMARY  # [H]
            canonical = torch.zeros(self.num_heads, width, dtype=torch.bool)
            canonical[torch.arange(self.num_heads), torch.tensor(table.canonical)] = True
            self.relevance = relevance.to(device)
            self.primary_row = primary.view(-1, 1).to(device)
            self.other_heads = (~primary).float().to(device)
            self._used = relevance.unsqueeze(-1).to(device)  # [N_op, H, 1]
            self._canonical_only = canonical.to(device)  # [H, A_max]

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

    def pack_by_op(
        self, masks: Sequence[torch.Tensor | None], batch: int, steps: int
    ) -> torch.Tensor:
        """Pack the per-op masks into `[B, T, N_op, H, A_max]`, True where a head has none.

        Only the per-op masks: the flat ones stay in `valid`, read by `valid_at_op`.

        Args:
            masks: Checked per-op masks of the heads other than `op`, in `HEAD_NAMES`
                order (`ActionMasks.by_op_tuple()`), each `[B, N_op, A_h]` (only when
                `T == 1`), `[B, 1, N_op, A_h]` or `[B, T, N_op, A_h]`, or `None`.
            batch: `B`.
            steps: `T`.
        """
        packed = torch.ones(
            batch, steps, self.num_ops, self.num_heads, self.padded_size,
            dtype=torch.bool, device=self.device,
        )  # fmt: skip
        for head, mask in zip(_CONDITIONED, masks, strict=True):
            if mask is not None:
                rows = packed[:, :, :, head, : self.head_sizes[head]]  # [B, T, N_op, A_h]
                rows.copy_(mask.view(batch, steps, *mask.shape[-2:]))
        return packed

    def valid_at_op(
        self, valid: torch.Tensor, by_op: torch.Tensor | None, op: torch.Tensor
    ) -> torch.Tensor:
        """The hierarchy's rule: what each head may take given each row's op.

        For `get_action` (at the sampled op), `evaluate_actions` (at the stored op) and
        the check of stored actions; `valid_every_op` is the same rule at every op.

        Args:
            valid: `[B, T, H, A_max]`, the packed flat masks.
            by_op: `[B, T, N_op, H, A_max]` from `pack_by_op`, or `None`.
            op: `[B, T]` int64 ops.

        Returns:
            `[B, T, H, A_max]` bool: the flat masks AND the per-op masks at `op` for
            the heads `op` uses (the op's own row is its flat mask), and only the
            canonical action for the heads it does not use.
        """
        assert self.relevance is not None  # hierarchical
        given = valid if by_op is None else valid & at_op(by_op, op)
        return self._rule(self.relevance_at(op).unsqueeze(-1), given)  # [B, T, H, A_max]

    def relevance_at(self, op: torch.Tensor) -> torch.Tensor:
        """`[B, T, H]` bool: the heads each row's op `[B, T]` uses (`op` itself always)."""
        assert self.relevance is not None  # hierarchical
        # index_select rather than `relevance[op]`: advanced indexing costs a few µs more.
        return self.relevance.index_select(0, op.reshape(-1)).view(*op.shape, self.num_heads)

    def valid_every_op(self, valid: torch.Tensor, by_op: torch.Tensor | None) -> torch.Tensor:
        """`valid_at_op` at every op at once, `[B, T, N_op, H, A_max]` (for the joint entropy)."""
        assert self._used is not None  # hierarchical
        given = valid.unsqueeze(2) if by_op is None else valid.unsqueeze(2) & by_op
        return self._rule(self._used, given)

    def _rule(self, used: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
        """`given` where the op uses the head, the canonical action alone where it does not."""
        assert self._canonical_only is not None  # hierarchical
        return torch.where(used, given, self._canonical_only)

    def needed(self, valid: torch.Tensor) -> torch.Tensor:
        """`[B, T, N_op, H]` bool: op `n` is valid under the flat op mask and uses the head."""
        assert self.relevance is not None  # hierarchical
        valid_ops = valid[..., PRIMARY, : self.num_ops].unsqueeze(-1)  # [B, T, N_op, 1]
        return valid_ops & self.relevance

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
