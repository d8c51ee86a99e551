"""Argument checks for `PolicyBundle`, with messages that say what to fix.

Each check names the argument, the head where there is one, what was expected and
what was given. These read only metadata (types, dtypes, shapes, keys, devices): they
cost no device sync. The checks of values, which need one, are in `value_checks`.
`check_network_output` checks what a bundle's hook returned, the other side of the
contract.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch

from esper.tamiyo.policy.action_space import CONDITIONED_HEADS, HEAD_NAMES, ActionSpace
from esper.tamiyo.policy.masks import BY_OP_NAMES, ActionMasks, check_mask_type

__all__ = [
    "HookContractError",
    "allowed_dtypes",
    "check_action_space",
    "check_actions",
    "check_by_op_mask",
    "check_episode_start",
    "check_features",
    "check_flag",
    "check_generator",
    "check_hidden",
    "check_hidden_shapes",
    "check_mask",
    "check_masks",
    "check_network_output",
    "check_not_inference",
    "check_positive_int",
    "check_state_dict",
    "check_step_layout",
]

_VALID_NAMES = ", ".join(HEAD_NAMES)


class HookContractError(RuntimeError):
    """A bundle's `_forward` hook returned something other than its declared layout.

    A bug in the bundle, not in the caller's arguments; the message names the tensor,
    the shape returned and the shape expected.
    """


def _check_dense(tensor: torch.Tensor, what: str) -> None:
    """Refuse a sparse (or otherwise non-strided) tensor: every check below assumes dense."""
    if tensor.layout != torch.strided:
        raise TypeError(
            f"{what} must be a dense tensor, got layout {tensor.layout}; convert it with "
            ".to_dense()"
        )


def check_flag(value: object, name: str) -> None:
    """Refuse a flag argument that is not a bool (a string such as "no" is truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")


def check_not_inference(features: torch.Tensor, hidden: tuple[torch.Tensor, ...] | None) -> None:
    """Refuse tensors made under `torch.inference_mode` where autograd must record a graph.

    Autograd cannot save them for backward: without this check the update fails deep
    inside the network with torch's "Inference tensors cannot be saved for backward".
    """
    named = [("features", features)]
    named += [(f"hidden[{index}]", tensor) for index, tensor in enumerate(hidden or ())]
    for name, tensor in named:
        if tensor.is_inference():
            raise ValueError(
                f"{name} was made under torch.inference_mode, and autograd cannot record "
                "a graph through it: make it outside inference mode (torch.no_grad() "
                "serves rollouts as well), or copy it outside: "
                "with torch.inference_mode(False): t = t.clone()"
            )


def _device_error(what: str, got: torch.device, want: torch.device) -> ValueError:
    return ValueError(
        f"{what} is on {got} but the bundle is on {want}; move it with .to(bundle.device)"
    )


def check_positive_int(value: object, name: str, owner: str, minimum: int = 1) -> int:
    """Check a constructor argument is an int of at least `minimum` (bools refused).

    Args:
        value: The argument.
        name: Its name, for the message.
        owner: The class being built, for the message.
        minimum: Smallest accepted value.

    Returns:
        `value`, as an int.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be at least {minimum}, got {value}")
    return value


def _dtype_error(what: str, got: torch.dtype, allowed: tuple[torch.dtype, ...]) -> TypeError:
    if len(allowed) == 1:
        return TypeError(
            f"{what} has dtype {got} but the bundle's parameters are {allowed[0]}; convert "
            "it with .to(bundle.dtype), or run under torch.autocast to mix precisions"
        )
    names = ", ".join(str(dtype) for dtype in dict.fromkeys(allowed))
    return TypeError(
        f"{what} has dtype {got}; under autocast the bundle takes {names}; convert it "
        "with .to(bundle.dtype)"
    )


def check_hidden_shapes(
    owner: str, hidden_shapes: Sequence[tuple[int, ...]] | None
) -> tuple[tuple[int, ...], ...] | None:
    """Check a constructor's `hidden_shapes` and freeze them into tuples.

    Returns:
        The shapes as a tuple of int tuples, or `None` for a stateless bundle.
    """
    if hidden_shapes is None:
        return None
    frozen = tuple(tuple(shape) for shape in hidden_shapes)
    for shape, dims in zip(hidden_shapes, frozen, strict=True):
        if len(dims) < 1 or not all(isinstance(d, int) and d >= 1 for d in dims):
            raise ValueError(
                f"{owner}: each hidden shape needs at least one positive int dimension "
                f"(the batch goes in dimension 1), got {shape!r}"
            )
    if not frozen:
        raise ValueError(f"{owner}: hidden_shapes must declare at least one tensor")
    return frozen


def allowed_dtypes(device: torch.device, dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """Dtypes features and hidden state may have on a network of `device` and `dtype`.

    The parameters' dtype; under autocast also float32 and the autocast dtype, the
    dtypes autocast itself mixes.
    """
    device_type = device.type
    if _autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return (dtype, torch.float32, torch.get_autocast_dtype(device_type))
    return (dtype,)


@functools.cache
def _autocast_available(device_type: str) -> bool:
    """Whether autocast exists for `device_type` (asking `is_autocast_enabled` of others raises)."""
    return torch.amp.is_autocast_available(device_type)


def check_action_space(action_space: object, owner: str) -> None:
    """Check a constructor's `action_space` argument is an `ActionSpace`."""
    if not isinstance(action_space, ActionSpace):
        raise TypeError(
            f"{owner}: action_space must be an ActionSpace, got {type(action_space).__name__}"
        )


def check_features(
    features: object,
    feature_dim: int | None,
    device: torch.device,
    dtypes: tuple[torch.dtype, ...],
) -> torch.Tensor:
    """Check features are a floating `[B, F]` or `[B, T, F]` tensor the network can take.

    Args:
        features: What the caller passed.
        feature_dim: `F`, or `None` to accept any width.
        device: The bundle's device.
        dtypes: The dtypes features may have (see `PolicyBundle._allowed_dtypes`).

    Returns:
        `features`, unchanged.
    """
    if not isinstance(features, torch.Tensor):
        raise TypeError(
            f"features must be a torch.Tensor of shape [B, F] or [B, T, F], "
            f"got {type(features).__name__}"
        )
    _check_dense(features, "features")
    if not features.is_floating_point():
        raise TypeError(
            f"features must be a floating-point tensor, got dtype {features.dtype}; "
            "convert it with .float()"
        )
    shape = features.shape
    rank = len(shape)
    if rank not in (2, 3):
        raise ValueError(
            f"features must be [B, F] (one step) or [B, T, F] (a sequence), "
            f"got rank {rank} with shape {tuple(shape)}"
        )
    if feature_dim is not None and shape[-1] != feature_dim:
        raise ValueError(
            f"features have width {shape[-1]} in their last dimension; "
            f"this bundle was built for feature_dim={feature_dim}"
        )
    if shape[0] == 0 or (rank == 3 and shape[1] == 0):
        raise ValueError(f"features have an empty batch or sequence, shape {tuple(shape)}")
    if features.device != device:
        raise _device_error("features", features.device, device)
    if features.dtype not in dtypes:
        raise _dtype_error("features", features.dtype, dtypes)
    return features


def check_masks(
    masks: ActionMasks | Mapping[str, torch.Tensor | None] | None,
    sizes: tuple[int, ...],
    batch: int,
    steps: int,
    single_step: bool,
    device: torch.device,
    num_ops: int | None = None,
) -> tuple[tuple[torch.Tensor | None, ...] | None, tuple[torch.Tensor | None, ...] | None]:
    """Check the masks of every head, and the per-op masks, against the features.

    Args:
        masks: What the caller passed: `ActionMasks`, a mapping of every head name to a
            mask or `None`, or `None`.
        sizes: Each head's number of actions, in `HEAD_NAMES` order.
        batch: `B` of the features.
        steps: `T` of the features (1 for a single step).
        single_step: The features were `[B, F]`.
        device: The bundle's device.
        num_ops: `N_op` when the space is hierarchical; `None` for a flat space, which
            refuses per-op masks.

    Returns:
        The flat masks in `HEAD_NAMES` order (`None` for an unmasked head), or `None`
        when no head is masked; then the per-op masks in `BY_OP_NAMES` order, or `None`
        when there are none.
    """
    if masks is None:
        return None, None
    given = masks if isinstance(masks, ActionMasks) else ActionMasks.from_mapping(masks)
    in_order = given.as_tuple()
    any_given = False
    for name, size, mask in zip(HEAD_NAMES, sizes, in_order, strict=True):
        if mask is None:
            continue
        any_given = True
        # The common case, decided with comparisons and no call; else say what is wrong.
        if not (
            isinstance(mask, torch.Tensor)
            and mask.dtype == torch.bool
            and mask.layout == torch.strided
            and mask.device == device
            and (mask.shape == (batch, steps, size) or (steps == 1 and mask.shape == (batch, size)))
        ):
            check_mask(mask, name, size, batch, steps, single_step, device)
    flat = in_order if any_given else None
    by_op = given.by_op_tuple()
    if all(mask is None for mask in by_op):
        return flat, None
    head_sizes = dict(zip(HEAD_NAMES, sizes, strict=True))
    for head, name, mask in zip(CONDITIONED_HEADS, BY_OP_NAMES, by_op, strict=True):
        if mask is None:
            continue
        if num_ops is None:
            raise ValueError(
                f"masks[{name!r}] is a per-op mask, but the action space is flat (no "
                "hierarchy); build the bundle with ActionSpace.tamiyo() (or an "
                f"ActionSpace with a hierarchy), or fold the mask into masks[{head!r}]"
            )
        size = head_sizes[head]
        if not (
            isinstance(mask, torch.Tensor)
            and mask.dtype == torch.bool
            and mask.layout == torch.strided
            and mask.device == device
            and (
                mask.shape == (batch, steps, num_ops, size)
                or (steps == 1 and mask.shape == (batch, num_ops, size))
            )
        ):
            check_by_op_mask(mask, name, size, num_ops, batch, steps, single_step, device)
    return flat, by_op


def check_by_op_mask(
    mask: object,
    name: str,
    size: int,
    num_ops: int,
    batch: int,
    steps: int,
    single_step: bool,
    device: torch.device,
) -> None:
    """Check one per-op mask against the features; raise naming the mask and dimension.

    Args:
        mask: `[B, N_op, A]` (when `T == 1`), `[B, 1, N_op, A]` or `[B, T, N_op, A]` bool.
        name: The mask's field, `slot_by_op` say, for messages.
        size: `A`, the head's number of actions.
        num_ops: `N_op`.
        batch: `B` of the features.
        steps: `T` of the features.
        single_step: The features were `[B, F]`.
        device: The bundle's device.
    """
    check_mask_type(mask, name)
    assert isinstance(mask, torch.Tensor)  # check_mask_type refuses every other type
    head = name.removesuffix("_by_op")
    _check_mask_layout(mask, name, head, (num_ops, size), batch, steps, single_step, device)


def check_mask(
    mask: object,
    head: str,
    size: int,
    batch: int,
    steps: int,
    single_step: bool,
    device: torch.device,
) -> None:
    """Check one head's mask against the features; raise naming what is wrong.

    `check_masks` runs this only when its one-comparison test of the common case
    fails, so it starts from the type (which `ActionMasks` checked when it was built,
    but `object.__setattr__` can change since).

    Args:
        mask: `[B, A]` (when `T == 1`), `[B, 1, A]` or `[B, T, A]` bool.
        head: The head's name, for messages.
        size: `A`, the head's number of actions.
        batch: `B` of the features.
        steps: `T` of the features (1 for a single step).
        single_step: The features were `[B, F]`.
        device: The bundle's device.
    """
    check_mask_type(mask, head)
    assert isinstance(mask, torch.Tensor)  # check_mask_type refuses every other type
    _check_mask_layout(mask, head, head, (size,), batch, steps, single_step, device)


def _check_mask_layout(
    mask: torch.Tensor,
    name: str,
    head: str,
    inner: tuple[int, ...],
    batch: int,
    steps: int,
    single_step: bool,
    device: torch.device,
) -> None:
    """A flat mask (`inner = (A,)`) or a per-op one (`(N_op, A)`) against the features.

    One step is `[B, *inner]` (when `T == 1`) or `[B, 1, *inner]`, a sequence
    `[B, T, *inner]`; the message names the mask, the dimension and what was expected.
    """
    what = f"masks[{name!r}]"
    form = "A" if len(inner) == 1 else "N_op, A"
    shape = tuple(mask.shape)
    rank = len(shape)
    check_step_layout(shape, what, form, len(inner), batch, steps, single_step)
    if len(inner) == 2 and shape[-2] != inner[0]:
        raise ValueError(
            f"{what} has {shape[-2]} ops in dimension {rank - 2} (N_op); the op head has {inner[0]}"
        )
    if shape[-1] != inner[-1]:
        raise ValueError(
            f"{what} has {shape[-1]} actions in its last dimension; head {head!r} has {inner[-1]}"
        )
    if mask.device != device:
        raise _device_error(what, mask.device, device)


def check_step_layout(
    shape: tuple[int, ...],
    what: str,
    form: str,
    inner_rank: int,
    batch: int,
    steps: int,
    single_step: bool,
) -> None:
    """Check the leading dimensions of a per-step tensor against the features.

    The rule of masks, per-op masks and extra inputs alike: with `inner_rank` trailing
    dimensions, one step is `[B, ...]` (when `T == 1`) or `[B, 1, ...]`, a sequence
    `[B, T, ...]`. The trailing dimensions are the caller's to check.

    Args:
        shape: The tensor's shape.
        what: Its name in messages (`masks['slot']`, `extra input 'x'`).
        form: Its trailing dimensions in messages (`A`, `N_op, A`, `3`).
        inner_rank: How many trailing dimensions it has.
        batch: `B` of the features.
        steps: `T` of the features (1 for a single step).
        single_step: The features were `[B, F]`.

    Raises:
        ValueError: The rank, the number of steps or the batch is wrong; the message
            names the tensor and what was expected.
    """
    rank = len(shape)
    lead = "[B]" if not form else f"[B, {form}]"
    sequence = "[B, T]" if not form else f"[B, T, {form}]"
    if rank == 1 + inner_rank:
        if steps != 1:
            raise ValueError(
                f"{what} has shape {shape} ({lead}) but the features are a sequence of "
                f"T={steps} steps; give it as {sequence} = {(batch, steps, *shape[1:])}"
            )
    elif rank != 2 + inner_rank:
        one = f"{lead} or {'[B, 1]' if not form else f'[B, 1, {form}]'}"
        raise ValueError(
            f"{what} must be {one if single_step else sequence}, got rank {rank} with shape {shape}"
        )
    elif shape[1] != steps:
        raise ValueError(
            f"{what} has {_steps(shape[1])} in dimension 1 but the features have T={steps}; "
            f"expected {(batch, steps, *shape[2:])}"
        )
    if shape[0] != batch:
        raise ValueError(f"{what} has batch {shape[0]} but the features have batch {batch}")


def check_hidden(
    hidden: object,
    shapes: tuple[tuple[int, ...], ...],
    batch: int,
    device: torch.device,
    dtypes: tuple[torch.dtype, ...],
) -> None:
    """Check a recurrent state against the bundle's declared hidden shapes.

    Args:
        hidden: What the caller passed.
        shapes: Each tensor's shape without the batch dimension (which goes in dim 1).
        batch: `B` of the features.
        device: The bundle's device.
        dtypes: The dtypes the state may have.
    """
    count = len(shapes)
    if not isinstance(hidden, tuple):
        raise TypeError(
            f"hidden must be a tuple of {count} tensor(s), as returned by initial_hidden() "
            f"or get_action(), or None; got {type(hidden).__name__}"
        )
    if len(hidden) != count:
        raise ValueError(f"hidden must hold {count} tensor(s), got {len(hidden)}")
    for index, (tensor, shape) in enumerate(zip(hidden, shapes, strict=True)):
        expected = (shape[0], batch, *shape[1:])
        if (
            type(tensor) is torch.Tensor
            and tensor.layout == torch.strided
            and tensor.shape == expected
            and tensor.device == device
            and tensor.dtype in dtypes
        ):
            continue  # the common case, decided without building any message
        name = f"hidden[{index}]"
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        _check_dense(tensor, name)
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be floating point, got dtype {tensor.dtype}")
        got = tuple(tensor.shape)
        if len(got) == len(expected) and got[1] != batch:
            raise ValueError(
                f"{name} has batch {got[1]} in dimension 1 but the features have batch "
                f"{batch}; reset it with initial_hidden({batch}) when the batch changes"
            )
        if got != expected:
            raise ValueError(f"{name} has shape {got}; expected {expected} ([d0, B, ...])")
        if tensor.device != device:
            raise _device_error(name, tensor.device, device)
        if tensor.dtype not in dtypes:
            raise _dtype_error(name, tensor.dtype, dtypes)


def check_episode_start(
    episode_start: object, batch: int, steps: int, single_step: bool, device: torch.device
) -> torch.Tensor:
    """Check episode-start flags against the features and bring them to `[B, T]`.

    Args:
        episode_start: What the caller passed: `[B]` (or `[B, 1]`) with `[B, F]`
            features, `[B, T]` with `[B, T, F]` features.
        batch: `B` of the features.
        steps: `T` of the features.
        single_step: The features were `[B, F]`.
        device: The bundle's device.

    Returns:
        `[B, T]` bool flags.
    """
    if not isinstance(episode_start, torch.Tensor):
        raise TypeError(
            f"episode_start must be a bool torch.Tensor, got {type(episode_start).__name__}"
        )
    _check_dense(episode_start, "episode_start")
    if episode_start.dtype != torch.bool:
        raise TypeError(
            f"episode_start must have dtype torch.bool (True where an episode starts), "
            f"got {episode_start.dtype}; convert it with .bool()"
        )
    shape = tuple(episode_start.shape)
    if steps == 1 and shape in ((batch,), (batch, 1)):
        flags = episode_start.view(batch, 1)
    elif not single_step and shape == (batch, steps):
        flags = episode_start
    else:
        expected = f"[B] = {(batch,)}" if single_step else f"[B, T] = {(batch, steps)}"
        raise ValueError(f"episode_start has shape {shape}; expected {expected}")
    if flags.device != device:
        raise _device_error("episode_start", flags.device, device)
    return flags


def check_generator(generator: object, device: torch.device) -> None:
    """Check a `generator=` argument is a `torch.Generator` on the bundle's device."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    if generator.device != device:
        raise ValueError(
            f"generator is on {generator.device} but the bundle is on {device}; make one "
            f"with torch.Generator(device=bundle.device)"
        )


def check_actions(
    actions: object,
    batch: int,
    steps: int,
    single_step: bool,
    device: torch.device,
) -> torch.Tensor:
    """Check actions for every head and pack them.

    Args:
        actions: Head name to integer tensors `[B]`, `[B, 1]` or `[B, T]`.
        batch: `B` of the features.
        steps: `T` of the features.
        single_step: The features were `[B, F]`.
        device: The bundle's device.

    Returns:
        `[B, T, H]` int64 actions in `HEAD_NAMES` order.
    """
    if not isinstance(actions, Mapping):
        raise TypeError(
            f"actions must be a mapping of head name to tensor (such as "
            f"ActionResult.action), got {type(actions).__name__}"
        )
    for key in actions:
        if key not in HEAD_NAMES:
            raise ValueError(f"actions has unknown head {key!r}; valid heads: {_VALID_NAMES}")
    columns: list[torch.Tensor] = []
    for head in HEAD_NAMES:
        if head not in actions:
            raise ValueError(f"actions is missing head {head!r}; every head needs its action")
        columns.append(_check_action(actions[head], head, batch, steps, single_step, device))
    return torch.stack(columns, dim=-1)  # [B, T, H]


def _check_action(
    action: object, head: str, batch: int, steps: int, single_step: bool, device: torch.device
) -> torch.Tensor:
    name = f"actions[{head!r}]"
    if not isinstance(action, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(action).__name__}")
    _check_dense(action, name)
    if action.is_floating_point() or action.is_complex() or action.dtype == torch.bool:
        raise TypeError(
            f"{name} must be an integer tensor (int64, as get_action returns), "
            f"got dtype {action.dtype}"
        )
    shape = tuple(action.shape)
    rank = len(shape)
    if rank == 1:
        if steps != 1:
            raise ValueError(
                f"{name} has shape {shape} ([B]) but the features are a sequence of "
                f"T={steps} steps; give it as [B, T] = {(batch, steps)}"
            )
    elif rank != 2:
        expected = "[B] or [B, 1]" if single_step else "[B, T]"
        raise ValueError(f"{name} must be {expected}, got rank {rank} with shape {shape}")
    elif shape[1] != steps:
        raise ValueError(
            f"{name} has {_steps(shape[1])} in dimension 1 but the features have T={steps}"
        )
    if shape[0] != batch:
        raise ValueError(f"{name} has batch {shape[0]} but the features have batch {batch}")
    if action.device != device:
        raise _device_error(name, action.device, device)
    action = action.unsqueeze(1) if rank == 1 else action
    return action if action.dtype == torch.long else action.long()


def check_state_dict(own: Mapping[str, object], incoming: object, owner: str, strict: bool) -> None:
    """Check a checkpoint fits a network before any tensor is copied.

    Args:
        own: The network's current `state_dict()`.
        incoming: The `state_dict` to load.
        owner: The bundle class, for messages.
        strict: Require exactly the same keys.
    """
    if not isinstance(incoming, Mapping):
        raise TypeError(f"{owner}: state_dict must be a mapping, got {type(incoming).__name__}")
    if strict:
        missing = [key for key in own if key not in incoming]
        unexpected = [key for key in incoming if key not in own]
        if missing or unexpected:
            raise ValueError(
                f"{owner}: the state_dict does not fit this bundle: missing keys "
                f"{missing[:5]}, unexpected keys {unexpected[:5]}; was it saved from "
                "another bundle class or config?"
            )
    for key, value in incoming.items():
        mine = own.get(key)
        if isinstance(mine, torch.Tensor):
            if not isinstance(value, torch.Tensor) or value.is_meta:
                raise ValueError(
                    f"{owner}: state_dict[{key!r}] must be a tensor with data, got "
                    f"{'a meta tensor' if isinstance(value, torch.Tensor) else type(value).__name__}"
                )
            if mine.shape != value.shape:
                raise ValueError(
                    f"{owner}: state_dict[{key!r}] has shape {tuple(value.shape)} but this "
                    f"bundle's has {tuple(mine.shape)}; it was saved with another config"
                )
        elif key.endswith("_extra_state") and mine is not None and mine != value:
            raise ValueError(
                f"{owner}: state_dict[{key!r}] is {value!r} but this bundle's is {mine!r}; "
                "it was saved with another config"
            )


def check_network_output(
    out: object,
    owner: str,
    batch: int,
    steps: int,
    logits_shape: tuple[int, int],
    hidden_shapes: tuple[tuple[int, ...], ...] | None,
    hidden_in: tuple[torch.Tensor, ...] | None,
    num_ops: int | None = None,
) -> None:
    """Check what a `_forward` hook returned honours the layout contract.

    Metadata only (types and shapes), so it costs no device sync and `torch.compile`
    traces it without a graph break.

    Args:
        out: The hook's return value.
        owner: The bundle's class name, for messages.
        batch: `B` of the inputs.
        steps: `T` of the inputs the hook was given.
        logits_shape: `(H, A_max)` of the padded logits.
        hidden_shapes: The bundle's declared hidden shapes, without the batch
            dimension; `None` when stateless.
        hidden_in: The hidden state the hook was given (checked): the state it returns
            must be on the same device, in a dtype the next call accepts.
        num_ops: `N_op` of a hierarchical space, whose hook may return op-conditioned
            logits; `None` for a flat space, which refuses them.

    Raises:
        TypeError: `out` is not a `NetworkOutput`-like 3- or 4-tuple.
        HookContractError: A tensor has the wrong shape, or the hidden state does not
            match the declared shapes (a `RuntimeError`); the message names the
            tensor, the shape returned and the shape expected.
    """
    if not (isinstance(out, tuple) and len(out) in (3, 4)):
        raise TypeError(
            f"{owner}._forward must return NetworkOutput(logits, value, hidden), "
            f"got {type(out).__name__}"
        )
    logits, value, hidden = out[:3]
    if len(out) == 4 and out[3] is not None:
        _check_logits_by_op(out[3], owner, logits, (batch, steps, *logits_shape), num_ops)
    if logits.shape != (batch, steps, *logits_shape):
        raise HookContractError(
            f"{owner}._forward returned logits of shape {tuple(logits.shape)}; expected "
            f"[B, T, H, A_max] = {(batch, steps, *logits_shape)}. End the network with "
            "PolicyHeads to get this layout."
        )
    if value.shape != (batch, steps):
        raise HookContractError(
            f"{owner}._forward returned value of shape {tuple(value.shape)}; expected "
            f"[B, T] = {(batch, steps)}"
        )
    if hidden_shapes is None:
        if hidden is not None:
            raise HookContractError(
                f"{owner}._forward returned a hidden state, but {owner} is stateless "
                "(is_recurrent=False): return None, or declare hidden_shapes and set "
                "is_recurrent = True"
            )
        return
    if not isinstance(hidden, tuple) or len(hidden) != len(hidden_shapes):
        given = type(hidden).__name__ if not isinstance(hidden, tuple) else f"{len(hidden)} tensors"
        raise HookContractError(
            f"{owner}._forward must return its new hidden state as a tuple of "
            f"{len(hidden_shapes)} tensor(s), as declared in hidden_shapes; got {given}"
        )
    for index, (tensor, shape) in enumerate(zip(hidden, hidden_shapes, strict=True)):
        expected = (shape[0], batch, *shape[1:])
        if not isinstance(tensor, torch.Tensor):
            raise HookContractError(
                f"{owner}._forward returned hidden[{index}] as a {type(tensor).__name__}; "
                "the hidden state is a tuple of tensors"
            )
        if tensor.shape != expected:
            got = tuple(tensor.shape)
            hint = (
                " (this one is batch-first: return it as .transpose(0, 1), and transpose "
                "inputs.hidden back when you read it)"
                if got == (batch, *shape)
                else ""
            )
            raise HookContractError(
                f"{owner}._forward returned hidden[{index}] of shape {got}, but "
                f"hidden_shapes[{index}] = {shape} declares [d0, B, ...] = {expected}: "
                f"the batch goes in dimension 1{hint}"
            )
        if hidden_in is not None:
            _check_returned_place(owner, index, tensor, hidden_in[index])


def _check_logits_by_op(
    logits_by_op: object,
    owner: str,
    logits: torch.Tensor,
    flat_shape: tuple[int, ...],
    num_ops: int | None,
) -> None:
    """The hook's op-conditioned logits: `[B, T, N_op, H, A_max]`, alike `logits`.

    Only in a hierarchical space; on the logits' device and in their dtype.
    """
    if num_ops is None:
        raise HookContractError(
            f"{owner}._forward returned logits_by_op, but the action space is flat (no "
            "hierarchy): per-op logits need an op chosen first; build the bundle with "
            "ActionSpace.tamiyo(), or return logits_by_op=None"
        )
    if not isinstance(logits_by_op, torch.Tensor):
        raise HookContractError(
            f"{owner}._forward returned logits_by_op as a {type(logits_by_op).__name__}; "
            "it is a tensor or None"
        )
    batch, steps, heads, width = flat_shape
    expected = (batch, steps, num_ops, heads, width)
    if logits_by_op.shape != expected:
        raise HookContractError(
            f"{owner}._forward returned logits_by_op of shape {tuple(logits_by_op.shape)}; "
            f"expected [B, T, N_op, H, A_max] = {expected}"
        )
    if logits_by_op.device != logits.device or logits_by_op.dtype != logits.dtype:
        raise HookContractError(
            f"{owner}._forward returned logits_by_op in {logits_by_op.dtype} on "
            f"{logits_by_op.device}, but its logits in {logits.dtype} on {logits.device}; "
            "return both alike"
        )


def _check_returned_place(
    owner: str, index: int, tensor: torch.Tensor, given: torch.Tensor
) -> None:
    """The returned `hidden[index]` is where the given one was, in a dtype it may have."""
    if tensor.device != given.device:
        raise HookContractError(
            f"{owner}._forward returned hidden[{index}] on {tensor.device}, but it was given "
            f"on {given.device}; return the new state on the bundle's device"
        )
    if tensor.dtype != given.dtype and tensor.dtype not in allowed_dtypes(
        given.device, given.dtype
    ):
        raise HookContractError(
            f"{owner}._forward returned hidden[{index}] in {tensor.dtype}, but it was given in "
            f"{given.dtype}; the next call would refuse it: return the state in the dtype "
            "it came in"
        )


def _steps(count: int) -> str:
    return "1 step" if count == 1 else f"{count} steps"
