"""`PolicyBundle`: the abstract base every Tamiyo policy bundle subclasses.

The base owns everything that is the same for every bundle: input normalization
(`_normalize_inputs`), input checking, masking, sampling, log-probabilities,
entropy and the shaping of results. A subclass builds a network and implements one
hook, `_forward`, that maps normalized inputs to logits, values and hidden state.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from esper.tamiyo.policy import categorical
from esper.tamiyo.policy.action_space import HEAD_NAMES, ActionSpace
from esper.tamiyo.policy.inputs import HiddenState, PolicyInputs, reset_hidden, steps_of
from esper.tamiyo.policy.layout import HeadLayout
from esper.tamiyo.policy.masks import ActionMasks
from esper.tamiyo.policy.outputs import ActionResult, EvalResult, ForwardResult, NetworkOutput
from esper.tamiyo.policy.validation import (
    check_action_space,
    check_actions,
    check_episode_start,
    check_features,
    check_generator,
    check_hidden,
    check_mask,
    check_positive_int,
    check_state_dict,
    explain_invalid_values,
)

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
    `initial_hidden` builds zeros from the declared shapes and the base checks every
    hidden state a caller passes against them.

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

    Attributes:
        is_recurrent: Class flag: the bundle carries hidden state between calls.
        check_values: Run the checks that need a device sync (NaN/Inf features, a mask
            row with no valid action, out-of-range or masked actions). On by default;
            switch off in a tight loop whose inputs are known good. Shape, dtype, key
            and device checks are always on: they cost no sync. Under autocast the
            dtype check accepts float32 and the autocast dtype as well.
        network: The `nn.Module`. Hand it to an optimizer or to
            `DistributedDataParallel`; move the bundle with `to()`.
        action_space: Head sizes.
        feature_dim: `F`, or `None` when any width is accepted.
    """

    is_recurrent: ClassVar[bool] = False
    _init_arguments: tuple[tuple[Any, ...], dict[str, Any]]

    def __init__(
        self,
        network: nn.Module,
        *,
        feature_dim: int | None,
        action_space: ActionSpace,
        hidden_shapes: Sequence[tuple[int, ...]] | None = None,
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
        self._hidden_shapes = _freeze_shapes(cls_name, hidden_shapes)
        self._head_sizes = action_space.sizes
        self._device = _module_device(network)
        self._autocast_type = _autocast_type(self._device)
        self._dtype = _module_dtype(network)
        self._layout = HeadLayout(action_space, self._device)
        # Set by compile(): its arguments, and the compiled compute paths. The paths are
        # compiled from the class's functions and take the bundle as an argument, so a
        # deep copy of a compiled bundle runs its own network.
        self._compile_kwargs: dict[str, Any] | None = None
        self._compiled_paths: tuple[_ActPath, _EvaluatePath] | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        """Create the bundle, remembering its constructor's arguments for `config`.

        So `config` (and checkpoints) can rebuild any bundle without each subclass
        reporting its own arguments.
        """
        self = super().__new__(cls)
        self._init_arguments = (_snapshot(args), _snapshot(kwargs))
        return self

    @property
    def config(self) -> dict[str, Any]:
        """The arguments the bundle was built with, by name, defaults filled in.

        `type(bundle)(**bundle.config)` builds an identical bundle (up to its weights)
        when the constructor takes no `*args` or `**kwargs` (those appear under their
        own names). Recorded when the bundle is created, whatever its class: a
        subclass need not report its own.
        """
        args, kwargs = self._init_arguments
        bound = inspect.signature(type(self).__init__).bind(self, *args, **kwargs)
        bound.apply_defaults()
        config = dict(bound.arguments)
        del config[next(iter(config))]  # self
        return config

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
    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        """Run the network on normalized inputs. Required; called by every public method.

        Called once per public call, after `_normalize_inputs` (once per stretch of the
        sequence when `episode_start` resets rows inside it), with autograd on
        (`forward`, `evaluate_actions`) or off (`get_action`, `get_value`). Call the
        network through `self.network(...)`, so module hooks (and DDP's) fire.

        Args:
            inputs: Checked inputs, features `[B, T, F]` and hidden state ready to use.

        Returns:
            Unmasked logits `[B, T, H, A_max]` (build them with `PolicyHeads`), values
            `[B, T]`, and the new hidden state (`None` when stateless).
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

        Returns:
            Actions and their log-probabilities per head and values, `[B]` for `[B, F]`
            features and `[B, T]` for `[B, T, F]`, and the new hidden state.

        Raises:
            TypeError: An argument has the wrong type or dtype.
            ValueError: An argument has the wrong shape, a wrong key, or bad values.
        """
        if generator is not None:
            check_generator(generator, self._device)
        inputs, valid = self._prepare(features, masks, hidden, episode_start=episode_start)
        with torch.no_grad():
            # Resets inside a sequence split it into stretches, a Python loop whose shape
            # changes with every pattern: that runs eager rather than recompile each time.
            paths = self._compiled_paths if not inputs.reset_steps else None
            if paths is None:
                actions, chosen, value, new_hidden = self._act(
                    inputs, valid, deterministic, generator
                )
            else:
                actions, chosen, value, new_hidden = paths[0](
                    self, inputs, valid, deterministic, generator
                )
        return ActionResult.from_packed(actions, chosen, value, new_hidden, inputs.single_step)

    def forward(
        self,
        features: torch.Tensor,
        masks: MaskArg,
        hidden: HiddenState | None = None,
        *,
        episode_start: torch.Tensor | None = None,
    ) -> ForwardResult:
        """Masked logits of every head and values, with autograd. Do not override.

        Args:
            features: `[B, F]` or `[B, T, F]`.
            masks: As for `get_action`.
            hidden: As for `get_action`.
            episode_start: As for `evaluate_actions`.

        Returns:
            Masked logits per head (`[B, A_h]` or `[B, T, A_h]`): each row shifted so
            its largest valid logit is 0 (softmax and argmax are unchanged), invalid
            actions at -1e4; values (`[B]` or `[B, T]`) and the new hidden state.

        Raises:
            TypeError: An argument has the wrong type or dtype.
            ValueError: An argument has the wrong shape, a wrong key, or bad values.
        """
        inputs, valid = self._prepare(features, masks, hidden, episode_start=episode_start)
        out = self._checked_forward(inputs)
        masked = categorical.mask_logits(
            out.logits, valid, self._layout.fill, self._layout.minus_inf
        )
        value = out.value
        if inputs.single_step:
            masked, value = masked.squeeze(1), value.squeeze(1)
        return ForwardResult(
            logits=self._layout.split_heads(masked), value=value, hidden=out.hidden
        )

    def evaluate_actions(
        self,
        features: torch.Tensor,
        actions: Mapping[str, torch.Tensor],
        masks: MaskArg,
        hidden: HiddenState | None = None,
        *,
        episode_start: torch.Tensor | None = None,
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

        Returns:
            Log-probabilities and normalized entropies per head, values, and the new
            hidden state; `[B]` for `[B, F]` features and `[B, T]` for `[B, T, F]`.

        Raises:
            TypeError: An argument has the wrong type or dtype.
            ValueError: An argument has the wrong shape, a wrong key, or bad values,
                including an action out of range or masked.
        """
        inputs, valid = self._prepare(features, masks, hidden, actions, episode_start)
        paths = self._compiled_paths if not inputs.reset_steps else None  # see get_action
        if paths is None:
            chosen, entropy, value, new_hidden = self._evaluate(inputs, valid)
        else:
            chosen, entropy, value, new_hidden = paths[1](self, inputs, valid)
        return EvalResult.from_packed(chosen, entropy, value, new_hidden, inputs.single_step)

    def get_value(
        self,
        features: torch.Tensor,
        hidden: HiddenState | None = None,
        *,
        episode_start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """State values only, without an autograd graph, to bootstrap a rollout.

        Do not override.

        Args:
            features: `[B, F]` or `[B, T, F]`.
            hidden: As for `get_action`.
            episode_start: As for `evaluate_actions`.

        Returns:
            `[B]` or `[B, T]` values.

        Raises:
            TypeError: An argument has the wrong type or dtype.
            ValueError: An argument has the wrong shape or bad values.
        """
        inputs, _ = self._prepare(features, None, hidden, episode_start=episode_start)
        with torch.no_grad():
            value = self._checked_forward(inputs).value  # [B, T]
        return value.squeeze(1) if inputs.single_step else value

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
        zeros: list[torch.Tensor] = []
        for shape in self._hidden_shapes:
            zeros.append(
                torch.zeros(
                    (shape[0], batch_size, *shape[1:]), device=self._device, dtype=self._dtype
                )
            )
        return tuple(zeros)

    @property
    def device(self) -> torch.device:
        """Where the network and the base's tables live."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the network's parameters; features and hidden state match it."""
        return self._dtype

    def to(
        self,
        device: torch.device | str | torch.dtype | None = None,
        dtype: torch.dtype | None = None,
    ) -> Self:
        """Move the network and the base's tables, in place; returns `self`.

        As `nn.Module.to`: `bundle.to("cuda")`, `bundle.to(torch.float64)`,
        `bundle.to("cuda", torch.bfloat16)`. Move a bundle with this method, not through
        `bundle.network`, so that the base's tables and its record of the device and
        dtype (which its input checks compare against) move too.

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
        if target is not None:
            self.network.to(device=target)
            self._layout.to(target)
            self._device = target
            self._autocast_type = _autocast_type(target)
        if dtype is not None:
            self.network.to(dtype=dtype)
            self._dtype = dtype
        return self

    def compile(self, **compile_kwargs: Any) -> Self:
        """Compile the compute paths with `torch.compile`, in place; returns `self`.

        What is compiled is what runs after the checks: the hook `_forward` and the
        masking, sampling and scoring of all heads (`_act` for `get_action`, `_evaluate`
        for `evaluate_actions`). `_normalize_inputs` with its checks, and the shaping
        of results, stay eager: a bad argument is refused with the same error, and no
        check can break the graph. The network itself is not wrapped, so `state_dict`
        keys, optimizers and `DistributedDataParallel` see the same module as before.

        `forward` and `get_value` stay eager. A recurrent hook that calls `nn.LSTM`
        (sequences of `LSTMPolicyBundle`) breaks the graph there unless
        `torch._dynamo.config.allow_rnn = True`; its single steps do not.

        Args:
            **compile_kwargs: Passed to `torch.compile` (`backend`, `mode`, `dynamic`,
                `fullgraph`, ...).

        Returns:
            The bundle.
        """
        self._compile_kwargs = dict(compile_kwargs)
        self._compiled_paths = _compile_paths(self._compile_kwargs)
        return self

    @property
    def is_compiled(self) -> bool:
        """Whether `compile()` was called."""
        return self._compile_kwargs is not None

    def __getstate__(self) -> dict[str, Any]:
        """Pickle and copy without the compiled paths; the copy compiles its own."""
        state = self.__dict__.copy()
        state["_compiled_paths"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a pickled or copied bundle, compiling it again if it was compiled."""
        self.__dict__.update(state)
        if self._compile_kwargs is not None:
            self._compiled_paths = _compile_paths(self._compile_kwargs)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a checkpoint `load_policy` rebuilds this bundle from; returns its path.

        The file holds the registered name, `config`, dtype, a format version and the
        weights, and is written atomically: a crash mid-save leaves the previous file
        as it was. See `esper.tamiyo.policy.checkpoint`.

        Raises:
            ValueError: The class is not registered (`register_policy`).
            TypeError: A `config` value cannot be stored safely.
        """
        from esper.tamiyo.policy.checkpoint import save_policy  # noqa: PLC0415 - a cycle

        return save_policy(self, path)

    def state_dict(self) -> dict[str, Any]:
        """The network's `state_dict`: the bundle's only state."""
        return self.network.state_dict()

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True
    ) -> _IncompatibleKeys:
        """Load weights into the network, all or nothing.

        Unlike `nn.Module.load_state_dict`, which copies tensors module by module and
        may stop half way, every key, shape and recorded head size is checked first: a
        refused checkpoint leaves the bundle exactly as it was.

        Args:
            state_dict: From `state_dict()` of a bundle of the same class and config.
            strict: Require exactly the same keys (as `nn.Module.load_state_dict`).

        Returns:
            The missing and unexpected keys (both empty when `strict`).

        Raises:
            ValueError: Keys, shapes or head sizes do not match this bundle.
        """
        check_state_dict(self.network.state_dict(), state_dict, type(self).__name__, strict)
        result: _IncompatibleKeys = self.network.load_state_dict(state_dict, strict=strict)
        return result

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(feature_dim={self.feature_dim}, "
            f"action_space={self.action_space}, device={self._device})"
        )

    # ------------------------------------------------------------------ internals

    def _normalize_inputs(
        self,
        features: torch.Tensor,
        masks: MaskArg,
        hidden: HiddenState | None,
        actions: Mapping[str, torch.Tensor] | None = None,
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

        Returns:
            `PolicyInputs` with features `[B, T, F]`, the checked masks, hidden state
            (zeros if none was given) and, for `evaluate_actions`, the actions packed
            `[B, T, H]`.

        Raises:
            TypeError: An argument has the wrong type or dtype.
            ValueError: An argument has the wrong shape or a wrong key.
        """
        dtypes = self._allowed_dtypes()
        features = check_features(features, self.feature_dim, self._device, dtypes)
        single_step = features.dim() == 2
        if single_step:
            features = features.unsqueeze(1)  # [B, 1, F]
        batch, steps = features.shape[0], features.shape[1]
        action_index = (
            None
            if actions is None
            else check_actions(actions, batch, steps, single_step, self._device)
        )  # [B, T, H]
        return PolicyInputs(
            features=features,
            hidden=self._resolve_hidden(hidden, batch, dtypes),
            action_index=action_index,
            single_step=single_step,
            given_masks=self._check_masks(masks, batch, steps, single_step),
        )

    def _check_masks(
        self, masks: MaskArg, batch: int, steps: int, single_step: bool
    ) -> ActionMasks:
        """Check masks against the features; `_NO_MASKS` when no head is masked."""
        if masks is None:
            return _NO_MASKS
        given = masks if isinstance(masks, ActionMasks) else ActionMasks.from_mapping(masks)
        any_given = False
        for name, size in zip(HEAD_NAMES, self._head_sizes, strict=True):
            mask = getattr(given, name)
            if mask is not None:
                check_mask(mask, name, size, batch, steps, single_step, self._device)
                any_given = True
        return given if any_given else _NO_MASKS

    def _prepare(
        self,
        features: torch.Tensor,
        masks: MaskArg,
        hidden: HiddenState | None,
        actions: Mapping[str, torch.Tensor] | None = None,
        episode_start: torch.Tensor | None = None,
    ) -> tuple[PolicyInputs, torch.Tensor]:
        """What every public method does before computing: normalize, reset, pack, check.

        Returns:
            The normalized inputs (hidden state already reset for the rows whose
            episode starts at the first step), and the masks packed for masking,
            `[B, T, H, A_max]` bool (True where valid, padding False).
        """
        inputs = self._normalize_inputs(features, masks, hidden, actions)
        batch, steps = inputs.features.shape[0], inputs.features.shape[1]
        if episode_start is not None:
            inputs = self._with_episode_starts(inputs, episode_start)
        given = inputs.given_masks
        if given is _NO_MASKS:
            valid = self._layout.all_valid(batch, steps)
        else:
            valid = self._layout.pack_masks(given, batch, steps)
        if self.check_values:
            self._check_values(inputs, valid)
        return inputs, valid

    def _with_episode_starts(
        self, inputs: PolicyInputs, episode_start: torch.Tensor
    ) -> PolicyInputs:
        """Check the flags; reset the first step's rows; find the steps that reset later."""
        starts = check_episode_start(
            episode_start,
            inputs.features.shape[0],
            inputs.features.shape[1],
            inputs.single_step,
            self._device,
        )  # [B, T]
        if inputs.hidden is None:  # stateless: nothing to reset
            return replace(inputs, episode_start=starts)
        later: tuple[int, ...] = ()
        if starts.shape[1] > 1:
            later = tuple((starts[:, 1:].any(dim=0).nonzero().flatten() + 1).tolist())  # sync
        return replace(
            inputs,
            hidden=reset_hidden(inputs.hidden, starts[:, 0]),
            episode_start=starts,
            reset_steps=later,
        )

    def _allowed_dtypes(self) -> tuple[torch.dtype, ...]:
        """Dtypes features and hidden state may have.

        The parameters' dtype; under autocast also float32 and the autocast dtype, the
        dtypes autocast itself mixes.
        """
        device_type = self._autocast_type
        if device_type is not None and torch.is_autocast_enabled(device_type):
            return (self._dtype, torch.float32, torch.get_autocast_dtype(device_type))
        return (self._dtype,)

    def _resolve_hidden(
        self, hidden: HiddenState | None, batch: int, dtypes: tuple[torch.dtype, ...]
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
            return self.initial_hidden(batch)
        check_hidden(hidden, self._hidden_shapes, batch, self._device, dtypes)
        return hidden

    def _check_values(self, inputs: PolicyInputs, valid: torch.Tensor) -> None:
        """Refuse NaN/Inf features, void mask rows, and out-of-range or masked actions.

        One device sync for all of them; only when one fails does the slow path look
        for the first offending row to name it. Without masks there is no void row to
        look for.
        """
        features = inputs.features
        action_index = inputs.action_index
        # One scalar, one sync: the features' sum is NaN or Inf if any feature is (or
        # if the sum overflows: the slow path then finds nothing and returns), and
        # dividing it by a False flag makes it Inf or NaN as well. Five kernels with
        # masks; the actions' check adds its own.
        total = features.sum(dtype=_SUM_DTYPE.get(features.dtype))  # []
        if inputs.given_masks is not _NO_MASKS:
            total = total / valid.any(dim=-1).all()
        if action_index is not None:
            total = total / _actions_valid(action_index, valid, self._layout.sizes).all()
        if not math.isfinite(total.item()):
            explain_invalid_values(
                features, valid, action_index, self._layout.sizes, inputs.single_step
            )
            # It returned: every value is fine, so the features' sum must have overflowed.
            if math.isfinite(features.sum(dtype=_SUM_DTYPE.get(features.dtype)).item()):
                raise AssertionError(
                    "esper.tamiyo.policy: the value check flagged inputs its slow path "
                    "finds valid; please report this"
                )

    # The compute paths: the hook, then masking, sampling and scoring of all heads on
    # the padded layout. Tensors in, tensors out, no checks: what `torch.compile` would
    # wrap, with `_normalize_inputs` and the shaping of results left outside.

    def _act(
        self,
        inputs: PolicyInputs,
        valid: torch.Tensor,
        deterministic: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, HiddenState | None]:
        """Sample (or take the mode of) every head: `(actions, log_probs, value, hidden)`.

        Returns:
            Actions and their log-probabilities `[B, T, H]`, values `[B, T]`, hidden.
        """
        out = self._checked_forward(inputs)
        masked = categorical.mask_logits(
            out.logits, valid, self._layout.fill, self._layout.minus_inf
        )
        log_probs = masked.log_softmax(dim=-1)  # [B, T, H, A_max]
        actions = categorical.sample(
            log_probs, deterministic=deterministic, generator=generator
        )  # [B, T, H]
        chosen = categorical.log_prob_of(log_probs, actions)  # [B, T, H]
        return actions, chosen, out.value, out.hidden

    def _evaluate(
        self, inputs: PolicyInputs, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, HiddenState | None]:
        """Score the given actions: `(log_probs, entropies, value, hidden)`.

        Returns:
            Log-probabilities and normalized entropies `[B, T, H]`, values `[B, T]`,
            hidden.
        """
        assert inputs.action_index is not None  # evaluate_actions always packs actions
        out = self._checked_forward(inputs)
        layout = self._layout
        masked = categorical.mask_logits(out.logits, valid, layout.fill, layout.minus_inf)
        log_probs = masked.log_softmax(dim=-1)  # [B, T, H, A_max]
        chosen = categorical.log_prob_of(log_probs, inputs.action_index)  # [B, T, H]
        entropy = categorical.normalized_entropy(
            masked, log_probs, valid, layout.inv_log_count
        )  # [B, T, H]
        return chosen, entropy, out.value, out.hidden

    def _checked_forward(self, inputs: PolicyInputs) -> NetworkOutput:
        """Call the hook, once per stretch between episode resets, and check its output.

        Without resets inside the sequence (the usual case) the hook runs once. With
        resets at steps `t1 < t2 < ...`, it runs on `[0, t1)`, `[t1, t2)`, ... in turn,
        the hidden state of the rows that reset zeroed between stretches, and the
        outputs are joined along `T`.
        """
        if not inputs.reset_steps:
            return self._checked_hook(inputs)
        starts = inputs.episode_start
        assert starts is not None  # reset_steps come from the flags
        logits: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        hidden = inputs.hidden
        bounds = (0, *inputs.reset_steps, inputs.features.shape[1])
        for begin, end in itertools.pairwise(bounds):
            if begin > 0:
                if hidden is None:
                    raise RuntimeError(
                        f"{type(self).__name__}._forward returned no hidden state for a "
                        "stretch of a sequence; a recurrent hook returns its new state"
                    )
                hidden = reset_hidden(hidden, starts[:, begin])
            out = self._checked_hook(steps_of(inputs, begin, end, hidden))
            logits.append(out.logits)
            values.append(out.value)
            hidden = out.hidden
        return NetworkOutput(torch.cat(logits, dim=1), torch.cat(values, dim=1), hidden)

    def _checked_hook(self, inputs: PolicyInputs) -> NetworkOutput:
        """Call the hook and check it honoured the layout contract."""
        out = self._forward(inputs)
        if not (isinstance(out, tuple) and len(out) == 3):
            raise TypeError(
                f"{type(self).__name__}._forward must return NetworkOutput(logits, value, "
                f"hidden), got {type(out).__name__}"
            )
        logits, value, hidden = out
        batch, steps = inputs.features.shape[0], inputs.features.shape[1]
        layout = self._layout
        if logits.shape != (batch, steps, layout.num_heads, layout.padded_size):
            raise RuntimeError(
                f"{type(self).__name__}._forward returned logits of shape "
                f"{tuple(logits.shape)}; expected [B, T, H, A_max] = "
                f"{(batch, steps, layout.num_heads, layout.padded_size)}. "
                "End the network with PolicyHeads to get this layout."
            )
        if value.shape != (batch, steps):
            raise RuntimeError(
                f"{type(self).__name__}._forward returned value of shape "
                f"{tuple(value.shape)}; expected [B, T] = {(batch, steps)}"
            )
        return NetworkOutput(logits, value, hidden)


_NO_MASKS = ActionMasks()

# Half-precision sums overflow early (fp16 at 65504): sum those in float32.
_SUM_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}

_ComputeResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor, HiddenState | None]
_ActPath = Callable[
    [PolicyBundle, PolicyInputs, torch.Tensor, bool, torch.Generator | None], _ComputeResult
]
_EvaluatePath = Callable[[PolicyBundle, PolicyInputs, torch.Tensor], _ComputeResult]

_FINAL_METHODS = (
    "__new__",
    "save",
    "config",
    "compile",
    "get_action",
    "forward",
    "evaluate_actions",
    "get_value",
    "initial_hidden",
    "_act",
    "_evaluate",
    "_checked_forward",
    "_checked_hook",
    "_prepare",
    "_with_episode_starts",
)


def _actions_valid(
    action_index: torch.Tensor, valid: torch.Tensor, sizes: torch.Tensor
) -> torch.Tensor:
    """`[B, T, H]` bool: each action is in its head's range and allowed by the mask."""
    in_range = (action_index >= 0) & (action_index < sizes)
    safe = action_index.clamp(0, valid.shape[-1] - 1)
    return in_range & valid.gather(-1, safe.unsqueeze(-1)).squeeze(-1)


def _autocast_type(device: torch.device) -> str | None:
    """`device.type` if autocast exists for it (asking about others raises), else `None`."""
    return device.type if torch.amp.is_autocast_available(device.type) else None


def _module_device(module: nn.Module) -> torch.device:
    for param in module.parameters():
        return param.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")


def _module_dtype(module: nn.Module) -> torch.dtype:
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def _freeze_shapes(
    cls_name: str, hidden_shapes: Sequence[tuple[int, ...]] | None
) -> tuple[tuple[int, ...], ...] | None:
    if hidden_shapes is None:
        return None
    frozen: list[tuple[int, ...]] = []
    for shape in hidden_shapes:
        dims = tuple(shape)
        if len(dims) < 1 or not all(isinstance(d, int) and d >= 1 for d in dims):
            raise ValueError(
                f"{cls_name}: each hidden shape needs at least one positive int dimension "
                f"(the batch goes in dimension 1), got {shape!r}"
            )
        frozen.append(dims)
    if not frozen:
        raise ValueError(f"{cls_name}: hidden_shapes must declare at least one tensor")
    return tuple(frozen)


def _compile_paths(compile_kwargs: dict[str, Any]) -> tuple[_ActPath, _EvaluatePath]:
    """`torch.compile` of the compute paths, as functions taking the bundle first."""
    act: _ActPath = torch.compile(PolicyBundle._act, **compile_kwargs)
    evaluate: _EvaluatePath = torch.compile(PolicyBundle._evaluate, **compile_kwargs)
    return act, evaluate


def _snapshot(value: Any) -> Any:
    """A copy of the lists, tuples and dicts in `value`; everything else as it is.

    So `config` reports the arguments as they were passed, even if the caller mutates
    a list it passed afterwards.
    """
    if isinstance(value, list):
        return [_snapshot(item) for item in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):  # not a NamedTuple
        return tuple(_snapshot(item) for item in value)
    if isinstance(value, dict):
        return {key: _snapshot(item) for key, item in value.items()}
    return value
