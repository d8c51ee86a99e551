"""`PolicyBundle`: the abstract base every Tamiyo policy bundle subclasses.

Every public call runs the same flow, top to bottom in this file:

1. `_prepare` checks every argument once and brings it to `[B, T, ...]`
   (`_normalize_inputs`), starts the episodes the caller flagged, and checks values;
2. a compute path (`compute`) calls the subclass's hook `_forward`, then masks,
   samples and scores all heads together on the padded `[B, T, H, A_max]` layout;
3. the packed results are shaped back for the caller (`outputs`).

A subclass builds a network and implements the one hook. The rest lives beside this
file, one concern each: argument checks in `validation`, the padded layout in
`layout`, masked categorical arithmetic in `categorical`, `compile` support in
`compiled`, constructor capture in `config`, and writing checkpoints in
`checkpoint_writer`.
"""

from __future__ import annotations

import inspect
import itertools
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from esper.tamiyo.policy import compute
from esper.tamiyo.policy.action_space import ActionSpace
from esper.tamiyo.policy.checkpoint_writer import write_checkpoint
from esper.tamiyo.policy.compiled import EAGER, CompiledPaths, Paths
from esper.tamiyo.policy.config import Arguments, bind, keyword_arguments, snapshot
from esper.tamiyo.policy.extra_inputs import (
    ExtraInput,
    MissingExtraInputError,
    check_extra_declarations,
    check_extras,
    check_names,
    check_present,
)
from esper.tamiyo.policy.floors import FloorTables, check_probability_floor
from esper.tamiyo.policy.inputs import HiddenState, PolicyInputs, reset_hidden, zero_hidden
from esper.tamiyo.policy.layout import HeadLayout, split_heads
from esper.tamiyo.policy.masks import ActionMasks
from esper.tamiyo.policy.outputs import (
    ActionResult,
    EvalResult,
    ForwardResult,
    HookOutput,
    NetworkOutput,
    OpConditionedOutput,
)
from esper.tamiyo.policy.registrations import name_of
from esper.tamiyo.policy.validation import (
    HookContractError,
    allowed_dtypes,
    check_action_space,
    check_actions,
    check_episode_start,
    check_features,
    check_flag,
    check_generator,
    check_hidden,
    check_hidden_shapes,
    check_masks,
    check_not_inference,
    check_positive_int,
    check_state_dict,
)
from esper.tamiyo.policy.value_checks import check_input_values, check_output_values

__all__ = ["MaskArg", "PolicyBundle"]

MaskArg = ActionMasks | Mapping[str, torch.Tensor | None] | None
"""What public methods accept as masks: `ActionMasks`, a strict mapping, or `None`."""


class PolicyBundle(ABC):
    """A policy over Tamiyo's eight factored action heads: subclass it to add one.

    A bundle wraps a network (`self.network`, an `nn.Module`) and gives the training
    code one API whatever the network: `get_action` for rollouts, `evaluate_actions`
    for PPO updates, `forward` for raw masked logits, `get_value` for bootstrapping.
    Each public method accepts `[B, F]` (one step) or `[B, T, F]` (a sequence)
    features, checks and normalizes its inputs once in `_normalize_inputs`, calls the
    subclass's `_forward` hook, then masks, samples, scores and shapes the results for
    all heads together.

    Public methods are not to be overridden. A subclass:

    * must implement `_forward(inputs) -> NetworkOutput` (called once by every public
      method, with `PolicyInputs` whose tensors are `[B, T, ...]`);
    * passes its network, feature width, action space and, if recurrent, the shapes of
      its hidden tensors to `super().__init__`;
    * sets the class flag `is_recurrent = True` if it carries hidden state;
    * may extend `_normalize_inputs` through `super()` to check more.

    Hidden state is a tuple of tensors, each `[d0, B, ...]` (batch in dimension 1);
    `initial_hidden` builds zeros from the declared shapes, and the base checks every
    hidden state a caller passes, and every one the hook returns, against them.

    The device and dtype are the network's, read from its tensors on every call:
    however the network is moved (`bundle.to`, `bundle.network.to`,
    `load_state_dict(..., assign=True)`, a `DistributedDataParallel` wrapper), the
    checks and the base's tables follow it.

    Example:
        A complete stateless bundle:

        >>> import torch
        >>> from torch import nn
        >>> from esper.tamiyo.policy import (
        ...     ActionSpace, NetworkOutput, PolicyBundle, PolicyHeads, PolicyInputs)
        >>> class TinyNet(nn.Module):
        ...     def __init__(self, feature_dim: int, space: ActionSpace) -> None:
        ...         super().__init__()
        ...         self.torso = nn.Sequential(nn.Linear(feature_dim, 32), nn.ReLU())
        ...         self.heads = PolicyHeads(32, space)
        ...     def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ...         return self.heads(self.torso(x))  # [B, T, H, A_max], [B, T]
        >>> class TinyBundle(PolicyBundle):
        ...     def __init__(self, feature_dim: int) -> None:
        ...         space = ActionSpace()
        ...         super().__init__(TinyNet(feature_dim, space), feature_dim=feature_dim,
        ...                          action_space=space)
        ...     def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        ...         logits, value = self.network(inputs.features)
        ...         return NetworkOutput(logits, value, None)
        >>> bundle = TinyBundle(feature_dim=10)
        >>> out = bundle.get_action(torch.randn(4, 10), masks=None)
        >>> out.action["op"].shape
        torch.Size([4])

    Args:
        network: The module holding every parameter of the bundle.
        feature_dim: `F`, the width of the features; `None` for a bundle that ignores
            its features (such as `UniformPolicyBundle`), which then takes any width.
        action_space: Head sizes.
        hidden_shapes: For a recurrent bundle, the shape of each hidden tensor without
            its batch dimension, e.g. `((num_layers, hidden_dim),) * 2` for an LSTM's
            `(h, c)` of shape `[num_layers, B, hidden_dim]`. `None` when stateless.
        probability_floor: Per-head probability floors, e.g. `{"op": 0.15,
            "blueprint": 0.12}`: every valid action of a floored head keeps at least
            that probability (lowered to `0.99 / n` for `n` valid actions), in every
            public method (see `floors`). `None`, the default, floors nothing. A
            subclass that offers floors takes `probability_floor` in its own constructor
            and passes it here, so that `config` and checkpoints record it.
        extra_inputs: The per-step inputs the network needs besides the features, one
            `ExtraInput` each (name, dtype kind, shape after `[B, T]`, range): callers
            pass them by name to every public method, and the base checks them and
            brings them to `[B, T, ...]` with the features (`PolicyInputs.extras`).
            Empty by default.

    Attributes:
        is_recurrent: Class flag: the bundle carries hidden state between calls.
        check_values: Run the checks that need a device sync (NaN/Inf features, a mask
            row with no valid action, out-of-range or masked actions). On by default;
            switch off in a tight loop whose inputs are known good. Shape, dtype, key
            and device checks are always on: they cost no sync. Under autocast the
            dtype check accepts float32 and the autocast dtype as well.
        network: The `nn.Module`. Hand it to an optimizer or to
            `DistributedDataParallel`.
        action_space: Head sizes.
        feature_dim: `F`, or `None` when any width is accepted.
        probability_floor: The floors, head name to float (empty: none). Settable on a
            live bundle, checked as at construction, when the class's constructor takes
            `probability_floor` (so `config` can record the new value).
    """

    is_recurrent: ClassVar[bool] = False
    _init_arguments: Arguments

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        """Create the bundle, remembering its constructor's arguments for `config`.

        So `config` (and checkpoints) can rebuild any bundle without each subclass
        reporting its own arguments.
        """
        self = super().__new__(cls)
        self._init_arguments = snapshot(args, kwargs)
        return self

    def __init__(
        self,
        network: nn.Module,
        *,
        feature_dim: int | None,
        action_space: ActionSpace,
        hidden_shapes: Sequence[tuple[int, ...]] | None = None,
        probability_floor: Mapping[str, float] | None = None,
        extra_inputs: Sequence[ExtraInput] = (),
    ) -> None:
        cls_name = type(self).__name__
        if not isinstance(network, nn.Module):
            raise TypeError(
                f"{cls_name}: network must be a torch.nn.Module, got {type(network).__name__}"
            )
        if feature_dim is not None:
            check_positive_int(feature_dim, "feature_dim", cls_name)
        check_action_space(action_space, cls_name)
        if self.is_recurrent != (hidden_shapes is not None):
            raise TypeError(
                f"{cls_name}: is_recurrent is {self.is_recurrent} but hidden_shapes is "
                f"{hidden_shapes!r}; a recurrent bundle declares the shapes of its hidden "
                "tensors, a stateless one passes None"
            )
        self.network = network
        self.feature_dim = feature_dim
        self.action_space = action_space
        self.check_values = True
        self._hidden_shapes = check_hidden_shapes(cls_name, hidden_shapes)
        # Where a network without any tensor lives: it has nothing to read that from.
        self._place_if_empty = (torch.device("cpu"), torch.get_default_dtype())
        self._layouts: dict[torch.device, HeadLayout] = {}  # the layout's tables per device
        self._paths: Paths = EAGER
        self._probability_floor = check_probability_floor(probability_floor, cls_name)
        self._floor_tables: dict[torch.device, FloorTables | None] = {}  # per device
        self._extra_inputs = check_extra_declarations(extra_inputs, cls_name)
        if self._extra_inputs and not _takes_extras(type(self)._normalize_inputs):
            raise TypeError(
                f"{cls_name} declares extra inputs but its _normalize_inputs override takes "
                "no extras: add `extras: Mapping[str, torch.Tensor] | None = None` and pass "
                "it on to super()._normalize_inputs"
            )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _FINAL_METHODS:
            if name in cls.__dict__:
                raise TypeError(
                    f"{cls.__name__} overrides PolicyBundle.{name}, which is not to be "
                    f"overridden; implement the hook _forward (and extend "
                    f"_normalize_inputs through super()) instead"
                )

    # ------------------------------------------------------------------ the hook

    @abstractmethod
    def _forward(self, inputs: PolicyInputs) -> NetworkOutput | OpConditionedOutput:
        """Run the network on normalized inputs. Required; called by every public method.

        Called once per public call, after `_normalize_inputs` (once per stretch of the
        sequence when `episode_start` resets rows inside it), with autograd on
        (`forward`, `evaluate_actions`) or off (`get_action`, `get_value`). Call the
        network through `self.network(...)`, so module hooks (and DDP's) fire.

        Args:
            inputs: Checked inputs, features `[B, T, F]` and hidden state ready to use.

        Returns:
            Unmasked logits `[B, T, H, A_max]` (build them with `PolicyHeads`), values
            `[B, T]`, and the new hidden state in the declared shapes (`None` when
            stateless), as a `NetworkOutput`; or, to make the other heads' logits
            depend on the op under a hierarchical space, an `OpConditionedOutput` that
            adds `logits_by_op` `[B, T, N_op, H, A_max]`.
        """

    # ------------------------------------------------------------------ public API

    def get_action(
        self,
        features: torch.Tensor,
        masks: MaskArg,
        hidden: HiddenState | None = None,
        *,
        deterministic: bool = False,
        episode_start: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> ActionResult:
        """Choose an action for every head, for a rollout. Do not override.

        Runs without building an autograd graph; everything returned, hidden state
        included, can be fed to a later `evaluate_actions` under autograd.

        Args:
            features: `[B, F]` (one step) or `[B, T, F]`.
            masks: `ActionMasks`, a mapping of every head name to a mask or `None`, or
                `None` for no masking. Masks are `[B, A_h]` or `[B, 1, A_h]` with
                `[B, F]` features, `[B, T, A_h]` with `[B, T, F]` (`[B, A_h]` if T is 1).
            hidden: State from `initial_hidden` or the previous call; `None` starts
                from zeros. Must be `None` for a stateless bundle.
            deterministic: Take each head's most likely valid action instead of sampling.
            episode_start: `[B]` bool (`[B, T]` with `[B, T, F]` features): rows whose
                episode starts at this step; their hidden state is zeroed first. A
                no-op for a stateless bundle.
            generator: Random source for sampling, on the bundle's device; torch's
                global generator (seeded by `torch.manual_seed`) when `None`.
            extras: The bundle's extra inputs (`extra_inputs`), name to tensor, shaped
                like the masks: `[B, *shape]` (or `[B, 1, *shape]`) with `[B, F]`
                features, `[B, T, *shape]` with `[B, T, F]`. Every declared input is
                required; `None` (the default) for a bundle that declares none.

        Returns:
            Actions and their log-probabilities per head and values, `[B]` for `[B, F]`
            features and `[B, T]` for `[B, T, F]`, and the new hidden state.

        Raises:
            TypeError: An argument has the wrong type or dtype.
            ValueError: An argument has the wrong shape, a wrong key, or bad values.
        """
        check_flag(deterministic, "deterministic")
        call = self._prepare(features, masks, hidden, episode_start=episode_start, extras=extras)
        if generator is not None:
            check_generator(generator, call.layout.device)
        with torch.no_grad():
            # Resets inside a sequence split it into stretches, a Python loop whose shape
            # changes with every pattern: that runs eager rather than recompile each time.
            paths = self._paths if not call.resets else EAGER
            out = paths.act(self, call, deterministic, generator)  # [B, T, H], [B, T]
        self._check_output(call, out.network)
        new_hidden = out.network.hidden
        if new_hidden is not None and torch.is_inference_mode_enabled():
            new_hidden = _usable_under_autograd(new_hidden)
        return ActionResult.from_packed(
            out.actions,
            out.log_prob,
            _no_graph(out.network.value),
            new_hidden,
            call.inputs.single_step,
        )

    def forward(
        self,
        features: torch.Tensor,
        masks: MaskArg,
        hidden: HiddenState | None = None,
        *,
        episode_start: torch.Tensor | None = None,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> ForwardResult:
        """Masked logits of every head and values, with autograd. Do not override.

        Args:
            features: `[B, F]` or `[B, T, F]`.
            masks: As for `get_action`.
            hidden: As for `get_action`.
            episode_start: As for `evaluate_actions`.
            extras: As for `get_action`.

        Returns:
            Masked logits per head (`[B, A_h]` or `[B, T, A_h]`): each row shifted so
            its largest valid logit is 0 (softmax and argmax are unchanged), invalid
            actions at -1e4; values (`[B]` or `[B, T]`) and the new hidden state. With
            probability floors, a floored head's entries are the floored distribution's
            log-probabilities, shifted alike: their softmax is the floored distribution.
            Under a hierarchical space these are the hook's flat logits under the flat
            masks: what a head may take, and its logits, given an op are applied once
            an op is chosen (`get_action`, `evaluate_actions`).

        Raises:
            TypeError: An argument has the wrong type or dtype.
            ValueError: An argument has the wrong shape, a wrong key, or bad values.
        """
        call = self._prepare(
            features, masks, hidden, episode_start=episode_start, autograd=True, extras=extras
        )
        out = compute.run_network(self, call)  # [B, T, H, A_max], [B, T]
        self._check_output(call, out)
        masked, value, new_hidden = compute.masked(out.logits, call), out.value, out.hidden
        if call.inputs.single_step:
            masked, value = masked.squeeze(1), value.squeeze(1)
        logits = split_heads(masked, self.action_space.sizes)
        return ForwardResult(logits=logits, value=value, hidden=new_hidden)

    def evaluate_actions(
        self,
        features: torch.Tensor,
        actions: Mapping[str, torch.Tensor],
        masks: MaskArg,
        hidden: HiddenState | None = None,
        *,
        episode_start: torch.Tensor | None = None,
        joint_entropy: bool = False,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> EvalResult:
        """Log-probabilities and entropies of given actions, with autograd. Do not override.

        The PPO update: pass the features, actions and masks a rollout stored, with the
        hidden state the rollout started the sequence from, and the log-probabilities
        equal those `get_action` returned.

        Args:
            features: `[B, F]` or `[B, T, F]`.
            actions: Every head name to integer actions (int64 as `get_action` gives
                them; other integer dtypes are converted), shaped like the masks without
                their last dimension (`[B]`, `[B, 1]` or `[B, T]`).
            masks: As for `get_action`; the same masks the actions were taken under.
            hidden: As for `get_action`.
            episode_start: `[B, T]` bool (`[B]` with `[B, F]` features), the flags the
                rollout passed to `get_action` step by step: the hidden state of a row
                is zeroed before each step where its episode starts, inside the
                sequence too, so the update sees exactly what the rollout saw.
            joint_entropy: Also compute the exact entropy of the whole action
                (`EvalResult.joint_entropy`); under a hierarchy it scores every head
                at every op, a few more kernels.
            extras: As for `get_action`: the inputs the rollout passed, stacked
                along `T` like the features.

        Returns:
            Log-probabilities and normalized entropies per head, values, the new hidden
            state, and per head its relevance and availability (see `EvalResult`);
            `[B]` for `[B, F]` features and `[B, T]` for `[B, T, F]`. Under a
            hierarchical space, figures are conditional on the stored op, and the heads
            it does not use have log-probability and entropy exactly 0.

        Raises:
            TypeError: An argument has the wrong type or dtype.
            ValueError: An argument has the wrong shape, a wrong key, or bad values,
                including an action out of range or masked, or (hierarchical) an
                action of a head the op does not use that is not its canonical one.
        """
        check_flag(joint_entropy, "joint_entropy")
        call = self._prepare(
            features, masks, hidden, actions, episode_start, autograd=True, extras=extras
        )
        if joint_entropy:
            call = call._replace(joint_entropy=True)
        paths = self._paths if not call.resets else EAGER  # see get_action
        out = paths.evaluate(self, call)  # [B, T, H] each, [B, T]
        self._check_output(call, out.network)
        return EvalResult.from_packed(
            out.log_prob,
            out.entropy,
            out.network.value,
            out.network.hidden,
            call.inputs.single_step,
            out.relevance,
            out.availability,
            out.joint_entropy,
        )

    def get_value(
        self,
        features: torch.Tensor,
        hidden: HiddenState | None = None,
        *,
        episode_start: torch.Tensor | None = None,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """State values only, without an autograd graph, to bootstrap a rollout.

        Do not override.

        Args:
            features: `[B, F]` or `[B, T, F]`.
            hidden: As for `get_action`.
            episode_start: As for `evaluate_actions`.
            extras: As for `get_action`.

        Returns:
            `[B]` or `[B, T]` values.

        Raises:
            TypeError: An argument has the wrong type or dtype.
            ValueError: An argument has the wrong shape or bad values.
        """
        call = self._prepare(features, None, hidden, episode_start=episode_start, extras=extras)
        with torch.no_grad():
            out = compute.run_network(self, call)
        self._check_output(call, out)
        value = _no_graph(out.value)  # [B, T]
        return value.squeeze(1) if call.inputs.single_step else value

    def initial_hidden(self, batch_size: int) -> HiddenState | None:
        """Zero hidden state for `batch_size` new episodes, or `None` when stateless.

        Do not override: declare `hidden_shapes` in `__init__` instead.

        Args:
            batch_size: `B`, a positive int.

        Returns:
            A tuple of zero tensors, each `[d0, B, ...]`, on the bundle's device and in
            its dtype; `None` for a stateless bundle.

        Raises:
            TypeError: `batch_size` is not an int.
            ValueError: `batch_size` is not positive.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size}")
        if self._hidden_shapes is None:
            return None
        device, dtype = self._place()
        with torch.inference_mode(False):  # usable by evaluate_actions even if made under it
            return zero_hidden(self._hidden_shapes, batch_size, device, dtype)

    # ------------------------------------------------------------------ the per-call flow

    def _normalize_inputs(
        self,
        features: torch.Tensor,
        masks: MaskArg,
        hidden: HiddenState | None,
        actions: Mapping[str, torch.Tensor] | None = None,
        *,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> PolicyInputs:
        """Check every argument once and bring it to the `[B, T, ...]` layout.

        Called exactly once by every public method, before the network runs, so a bad
        argument is refused with a message naming it and nothing has changed. A
        subclass may extend this through `super()` to check more; it must return what
        `super()` returns (or a `dataclasses.replace` of it).

        Args:
            features: `[B, F]` or `[B, T, F]` floating features.
            masks: `ActionMasks`, a mapping, or `None`.
            hidden: Hidden state, or `None`.
            actions: Head name to actions, for `evaluate_actions`.
            extras: Name to extra input, as the caller passed them (`None`: none). A
                bundle that declares extra inputs and overrides this takes `extras` (by
                name: the base passes it so) and passes it on to `super()`; for one that declares none, the base checks
                that none were given and calls this without it, so an override written
                before extra inputs existed keeps working.

        Returns:
            `PolicyInputs` with features `[B, T, F]`, the masks packed `[B, T, H, A_max]`,
            hidden state (zeros if none was given), the extra inputs `[B, T, ...]` and,
            for `evaluate_actions`, the actions packed `[B, T, H]`.

        Raises:
            TypeError: An argument has the wrong type or dtype.
            ValueError: An argument has the wrong shape or a wrong key.
        """
        device, dtype = self._place()
        dtypes = allowed_dtypes(device, dtype)
        features = check_features(features, self.feature_dim, device, dtypes)
        single_step = features.dim() == 2
        if single_step:
            features = features.unsqueeze(1)  # [B, 1, F]
        batch, steps = features.shape[0], features.shape[1]
        action_index = (
            None if actions is None else check_actions(actions, batch, steps, single_step, device)
        )  # [B, T, H]
        hidden = self._resolve_hidden(hidden, batch, device, dtype, dtypes)
        layout = self._layout_for(device)
        num_ops = layout.num_ops if layout.hierarchical else None
        given, by_op = check_masks(
            masks, layout.head_sizes, batch, steps, single_step, device, num_ops
        )
        valid = (
            layout.all_valid(batch, steps)
            if given is None
            else layout.pack_masks(given, batch, steps)
        )  # [B, T, H, A_max]
        return PolicyInputs(
            features=features,
            hidden=hidden,
            valid=valid,
            action_space=self.action_space,
            action_index=action_index,
            single_step=single_step,
            valid_by_op=None if by_op is None else layout.pack_by_op(by_op, batch, steps),
            extras=check_extras(
                extras,
                self._extra_inputs,
                type(self).__name__,
                batch,
                steps,
                single_step,
                device,
                dtypes,
            ),
        )

    def _prepare(
        self,
        features: torch.Tensor,
        masks: MaskArg,
        hidden: HiddenState | None,
        actions: Mapping[str, torch.Tensor] | None = None,
        episode_start: torch.Tensor | None = None,
        *,
        autograd: bool = False,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> compute.Call:
        """What every public method does before computing: normalize, start episodes, check.

        Args:
            features: As the public method got them; likewise `masks`, `hidden`,
                `actions` and `episode_start`.
            masks: See `features`.
            hidden: See `features`.
            actions: See `features`.
            episode_start: See `features`.
            extras: See `features`.
            autograd: The method records an autograd graph (`forward`,
                `evaluate_actions`): tensors made under `torch.inference_mode` cannot
                take part, so they are refused here.

        Returns:
            The call for a compute path: the normalized inputs (hidden state already
            reset for the rows whose episode starts at the first step), the layout's
            tables, and the later steps where episodes start.
        """
        if self._extra_inputs:
            owner = type(self).__name__
            check_present(check_names(extras, self._extra_inputs, owner), self._extra_inputs, owner)
            try:
                inputs = self._normalize_inputs(features, masks, hidden, actions, extras=extras)
            except (
                MissingExtraInputError
            ) as error:  # the caller gave them all: an override lost one
                raise HookContractError(
                    f"{owner}._normalize_inputs did not pass the caller's extras on to "
                    f"super()._normalize_inputs ({error})"
                ) from None
            self._check_extras_kept(inputs)
        else:  # none declared: refuse any, and call an override that predates extras as before
            if extras is not None:
                check_names(extras, (), type(self).__name__)
            inputs = self._normalize_inputs(features, masks, hidden, actions)
        if autograd and torch.is_grad_enabled():
            check_not_inference(inputs.features, inputs.hidden)
        resets: tuple[int, ...] = ()
        if episode_start is not None:
            inputs, resets = self._start_episodes(inputs, episode_start)
        device = inputs.features.device
        layout = self._layout_for(device)
        if self.check_values:
            check_input_values(inputs, layout, masked=masks is not None, specs=self._extra_inputs)
        return compute.Call(inputs, layout, resets, floors=self._floors_for(device))

    def _check_extras_kept(self, inputs: PolicyInputs) -> None:
        """Refuse a `_normalize_inputs` override that lost a declared extra input."""
        for spec in self._extra_inputs:
            if spec.name not in inputs.extras:
                raise HookContractError(
                    f"{type(self).__name__}._normalize_inputs returned inputs without the "
                    f"extra input {spec.name!r} it declares: take extras, pass them on to "
                    "super()._normalize_inputs and keep what it returns in inputs.extras"
                )

    def _check_output(self, call: compute.Call, out: HookOutput) -> None:
        """Refuse non-finite numbers out of the network, when `check_values` is on."""
        if self.check_values:
            check_output_values(type(self).__name__, out, call.layout, call.inputs.single_step)

    def _start_episodes(
        self, inputs: PolicyInputs, episode_start: torch.Tensor
    ) -> tuple[PolicyInputs, tuple[int, ...]]:
        """Check the flags; reset the first step's rows; find the later steps that reset."""
        starts = check_episode_start(
            episode_start,
            inputs.batch_size,
            inputs.seq_len,
            inputs.single_step,
            inputs.features.device,
        )  # [B, T]
        if inputs.hidden is None:  # stateless: nothing to reset
            return replace(inputs, episode_start=starts), ()
        later: tuple[int, ...] = ()
        if inputs.seq_len > 1:
            later = tuple((starts[:, 1:].any(dim=0).nonzero().flatten() + 1).tolist())  # sync
        hidden = reset_hidden(inputs.hidden, starts[:, 0])
        return replace(inputs, hidden=hidden, episode_start=starts), later

    def _resolve_hidden(
        self,
        hidden: HiddenState | None,
        batch: int,
        device: torch.device,
        dtype: torch.dtype,
        dtypes: tuple[torch.dtype, ...],
    ) -> HiddenState | None:
        """Check the caller's hidden state, or start from zeros when it gave none."""
        if self._hidden_shapes is None:
            if hidden is not None:
                raise ValueError(
                    f"hidden must be None: {type(self).__name__} is stateless "
                    f"(is_recurrent=False), got {type(hidden).__name__}"
                )
            return None
        if hidden is None:
            return zero_hidden(self._hidden_shapes, batch, device, dtype)
        check_hidden(hidden, self._hidden_shapes, batch, device, dtypes)
        return hidden

    # ------------------------------------------------------------------ device and dtype

    @property
    def device(self) -> torch.device:
        """Where the network's tensors are, read from them now."""
        return self._place()[0]

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the network's tensors; features and hidden state match it."""
        return self._place()[1]

    def to(
        self,
        device: torch.device | str | torch.dtype | None = None,
        dtype: torch.dtype | None = None,
    ) -> Self:
        """Move the network, in place; returns `self`.

        As `nn.Module.to`: `bundle.to("cuda")`, `bundle.to(torch.float64)`,
        `bundle.to("cuda", torch.bfloat16)`. The same as `bundle.network.to(...)`, with
        the arguments checked first; a bundle whose network has no tensor at all (such
        as `UniformPolicyBundle`) records the move here.

        Args:
            device: Target device, or a floating dtype, or `None` to stay.
            dtype: Floating dtype for the network's parameters, or `None` to keep it.

        Raises:
            TypeError: `dtype` is not a floating `torch.dtype`, or both arguments are dtypes.
            RuntimeError: `device` is not one torch can use here (torch's own error;
                for "cuda" on a CPU build an AssertionError); nothing has moved.
        """
        if isinstance(device, torch.dtype):
            if dtype is not None:
                raise TypeError(f"to() got two dtypes: {device} and {dtype}")
            device, dtype = None, device
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        # Canonical form ("cuda" -> "cuda:0") so it compares equal to tensors' devices;
        # resolving it first also refuses a bad device before anything moves.
        target = None if device is None else torch.empty(0, device=device).device
        self.network.to(device=target, dtype=dtype)
        empty_device, empty_dtype = self._place_if_empty
        self._place_if_empty = (
            empty_device if target is None else target,
            empty_dtype if dtype is None else dtype,
        )
        return self

    def _place(self) -> tuple[torch.device, torch.dtype]:
        """The network's device and floating dtype, read from its tensors now.

        The one source of truth for both: nothing is cached, so however the network was
        moved, the checks agree with it. About 2 µs a call on a CPU.
        """
        for _, param in self.network.named_parameters(remove_duplicate=False):
            if param.is_floating_point():
                return param.device, param.dtype
            break
        device: torch.device | None = None
        for tensor in itertools.chain(self.network.parameters(), self.network.buffers()):
            device = tensor.device if device is None else device
            if tensor.is_floating_point():
                return device, tensor.dtype
        fallback_device, fallback_dtype = self._place_if_empty
        return fallback_device if device is None else device, fallback_dtype

    def _layout_for(self, device: torch.device) -> HeadLayout:
        """The padded layout's tables on `device`, built on first use there."""
        layout = self._layouts.get(device)
        if layout is None:
            with torch.inference_mode(False):  # normal tensors, usable under autograd later
                layout = self._layouts[device] = HeadLayout(self.action_space, device)
        return layout

    def _floors_for(self, device: torch.device) -> FloorTables | None:
        """The floors' tables on `device`, built on first use there; `None` without floors."""
        cache = self._floor_tables  # a live change swaps in a new dict: this one stays whole
        if device in cache:
            return cache[device]
        with torch.inference_mode(False):  # normal tensors, usable under autograd later
            tables = FloorTables.build(self._probability_floor, self.action_space, device)
        cache[device] = tables
        return tables

    # ------------------------------------------------------------------ the rest

    @property
    def extra_inputs(self) -> tuple[ExtraInput, ...]:
        """The per-step inputs this bundle needs besides its features (empty: none)."""
        return self._extra_inputs

    @property
    def probability_floor(self) -> dict[str, float]:
        """The per-head probability floors, head name to float; empty when there are none."""
        return dict(self._probability_floor)

    @probability_floor.setter
    def probability_floor(self, value: Mapping[str, float] | None) -> None:
        cls_name = type(self).__name__
        if "probability_floor" not in bind(type(self), self._init_arguments):
            raise TypeError(
                f"{cls_name}: its constructor does not take probability_floor, so config "
                "and checkpoints could not record floors set here; add "
                "`probability_floor: Mapping[str, float] | None = None` to its __init__ and "
                "pass it to PolicyBundle.__init__"
            )
        floors = check_probability_floor(value, cls_name)  # refused before anything changes
        self._probability_floor = floors
        self._floor_tables = {}

    @property
    def config(self) -> dict[str, Any]:
        """The arguments the bundle was built with, by name, defaults filled in.

        `type(bundle)(**bundle.config)` builds an identical bundle (up to its weights)
        when the constructor takes no `*args` or `**kwargs` (those appear under their
        own names). Recorded when the bundle is created, whatever its class: a
        subclass need not report its own. `probability_floor`, which can change on a
        live bundle, is its current value.
        """
        config = bind(type(self), self._init_arguments)
        if "probability_floor" in config:
            config["probability_floor"] = self.probability_floor or None
        return config

    def compile(self, **compile_kwargs: Any) -> Self:
        """Compile the compute paths with `torch.compile`, in place; returns `self`.

        What is compiled is what runs after the checks: the hook `_forward` and the
        masking, sampling and scoring of all heads (`compute.act` for `get_action`,
        `compute.evaluate` for `evaluate_actions`). `_normalize_inputs` with its
        checks, and the shaping of results, stay eager: a bad argument is refused with
        the same error, and no check can break the graph. The network itself is not
        wrapped, so `state_dict` keys, optimizers and `DistributedDataParallel` see the
        same module as before.

        `forward` and `get_value` stay eager. A recurrent hook that calls `nn.LSTM`
        (sequences of `LSTMPolicyBundle`) breaks the graph there unless
        `torch._dynamo.config.allow_rnn = True`; its single steps do not.

        Args:
            **compile_kwargs: Passed to `torch.compile` (`backend`, `mode`, `dynamic`,
                `fullgraph`, ...).

        Returns:
            The bundle.
        """
        self._paths = CompiledPaths(compile_kwargs)
        return self

    @property
    def is_compiled(self) -> bool:
        """Whether `compile()` was called."""
        return isinstance(self._paths, CompiledPaths)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a checkpoint `load_policy` rebuilds this bundle from; returns its path.

        The file holds the registered name, `config`, dtype, a format version and the
        weights, and is written atomically: a crash mid-save leaves the previous file
        as it was. See `esper.tamiyo.policy.checkpoint.save_policy`.

        Raises:
            ValueError: The class is not registered (`register_policy`), `path` is
                empty, or a weight holds NaN or Inf (`load_policy` would refuse it).
            TypeError: A `config` value or a piece of state cannot be stored safely.
            IsADirectoryError: `path` names a folder.
            OSError: Writing failed (disk full, no permission, ...): the message names
                the file and the cause, the errno is kept, the previous file is intact.
        """
        cls = type(self)
        return write_checkpoint(
            path,
            policy=name_of(cls),
            config=keyword_arguments(cls, self.config),
            dtype=self.dtype,
            state_dict=self.state_dict(),
            network=self.network,
            owner=cls.__name__,
        )

    def state_dict(self) -> dict[str, Any]:
        """The network's `state_dict`: the bundle's only state."""
        return self.network.state_dict()

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
        """Load weights into the network, all or nothing.

        Unlike `nn.Module.load_state_dict`, which copies tensors module by module and
        may stop half way, every key, shape and recorded head size is checked first: a
        refused checkpoint leaves the bundle exactly as it was.

        Args:
            state_dict: From `state_dict()` of a bundle of the same class and config.
            strict: Require exactly the same keys (as `nn.Module.load_state_dict`).
            assign: Take the given tensors as the parameters instead of copying into
                them (as `nn.Module.load_state_dict`): the network then has their
                device and dtype, and so has the bundle.

        Returns:
            The missing and unexpected keys (both empty when `strict`).

        Raises:
            ValueError: Keys, shapes or head sizes do not match this bundle.
        """
        check_state_dict(self.network.state_dict(), state_dict, type(self).__name__, strict)
        result: _IncompatibleKeys = self.network.load_state_dict(
            state_dict, strict=strict, assign=assign
        )
        return result

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(feature_dim={self.feature_dim}, "
            f"action_space={self.action_space}, device={self.device})"
        )


def _takes_extras(method: Any) -> bool:
    """Whether a `_normalize_inputs` can be called with `extras=...`, as `_prepare` calls it.

    A signature that cannot be read is taken to: the call itself will say if not.
    """
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return True
    given = parameters.get("extras")
    if given is not None and given.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    ):
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


_FINAL_METHODS = (
    "__new__",
    "save",
    "config",
    "probability_floor",
    "extra_inputs",
    "compile",
    "get_action",
    "forward",
    "evaluate_actions",
    "get_value",
    "initial_hidden",
    "_prepare",
    "_start_episodes",
    "_check_output",
)


def _no_graph(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` detached if it still requires grad, which no op's result does here.

    A view of a parameter made under `torch.no_grad` does (a hook may return one as
    its value); `get_action` promises tensors without autograd history.
    """
    return tensor.detach() if tensor.requires_grad else tensor


def _usable_under_autograd(hidden: HiddenState) -> HiddenState:
    """A copy of `hidden` made outside `torch.inference_mode`, which autograd can use.

    A state `get_action` returns under inference mode would otherwise be refused by
    the `evaluate_actions` of the PPO update.
    """
    with torch.inference_mode(False):
        return tuple(tensor.clone() for tensor in hidden)
