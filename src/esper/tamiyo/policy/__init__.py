"""Policy bundles for Tamiyo: factored, masked action heads on one abstract base.

A policy bundle turns features describing a training run into one action per head
(`HEAD_NAMES`), under boolean action masks. `PolicyBundle` owns input normalization,
checking, masking, sampling, log-probabilities and entropy; a bundle such as
`LSTMPolicyBundle`, `MLPPolicyBundle` or `UniformPolicyBundle` supplies the network.
Bundles register by name (`register_policy`) so that configs can build them
(`create_policy`).

Example:
    >>> import torch
    >>> from esper.tamiyo.policy import ActionMasks, create_policy
    >>> bundle = create_policy("lstm", feature_dim=16)
    >>> masks = ActionMasks(op=torch.tensor([[True, True, False, False, False, False]]))
    >>> step = bundle.get_action(torch.randn(1, 16), masks)
    >>> int(step.action["op"]) in (0, 1)
    True
"""

from esper.tamiyo.policy.action_space import (
    HEAD_NAMES,
    TAMIYO_HIERARCHY,
    TAMIYO_OPS,
    ActionHierarchy,
    ActionSpace,
)
from esper.tamiyo.policy.base import MaskArg, PolicyBundle
from esper.tamiyo.policy.checkpoint import (
    CheckpointError,
    UnregisteredPolicyError,
    load_policy,
    save_policy,
)
from esper.tamiyo.policy.extra_inputs import ExtraInput
from esper.tamiyo.policy.heads import OpConditionedLogits, PolicyHeads
from esper.tamiyo.policy.inputs import HiddenState, PolicyInputs
from esper.tamiyo.policy.layout import MASKED_LOGIT
from esper.tamiyo.policy.lstm import LSTMPolicyBundle
from esper.tamiyo.policy.masks import ActionMasks
from esper.tamiyo.policy.mlp import MLPPolicyBundle
from esper.tamiyo.policy.outputs import (
    ActionResult,
    EvalResult,
    ForwardResult,
    NetworkOutput,
    OpConditionedOutput,
)
from esper.tamiyo.policy.registry import create_policy, get_policy, list_policies, register_policy
from esper.tamiyo.policy.uniform import UniformPolicyBundle
from esper.tamiyo.policy.validation import HookContractError

__all__ = [
    "HEAD_NAMES",
    "MASKED_LOGIT",
    "TAMIYO_HIERARCHY",
    "TAMIYO_OPS",
    "ActionHierarchy",
    "ActionMasks",
    "ActionResult",
    "ActionSpace",
    "CheckpointError",
    "EvalResult",
    "ExtraInput",
    "ForwardResult",
    "HiddenState",
    "HookContractError",
    "LSTMPolicyBundle",
    "MLPPolicyBundle",
    "MaskArg",
    "NetworkOutput",
    "OpConditionedLogits",
    "OpConditionedOutput",
    "PolicyBundle",
    "PolicyHeads",
    "PolicyInputs",
    "UniformPolicyBundle",
    "UnregisteredPolicyError",
    "create_policy",
    "get_policy",
    "list_policies",
    "load_policy",
    "register_policy",
    "save_policy",
]
