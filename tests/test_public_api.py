"""The exported API is pinned: changing it is a visible, reviewed decision."""

from __future__ import annotations

from importlib.resources import files

from esper.tamiyo import policy

EXPECTED = [
    "HEAD_NAMES",
    "MASKED_LOGIT",
    "ActionMasks",
    "ActionResult",
    "ActionSpace",
    "CheckpointError",
    "EvalResult",
    "ForwardResult",
    "HiddenState",
    "LSTMPolicyBundle",
    "MLPPolicyBundle",
    "MaskArg",
    "NetworkOutput",
    "PolicyBundle",
    "PolicyHeads",
    "PolicyInputs",
    "UniformPolicyBundle",
    "create_policy",
    "get_policy",
    "list_policies",
    "load_policy",
    "register_policy",
    "save_policy",
]


def test_all_is_pinned() -> None:
    assert policy.__all__ == EXPECTED


def test_every_export_exists_and_is_documented() -> None:
    for name in policy.__all__:
        obj = getattr(policy, name)
        if callable(obj) and not isinstance(obj, type(policy.HiddenState)):
            assert obj.__doc__, f"{name} has no docstring"


def test_package_ships_py_typed() -> None:
    assert files("esper.tamiyo.policy").joinpath("py.typed").is_file()
