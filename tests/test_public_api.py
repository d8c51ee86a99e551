"""The exported API is pinned: changing it is a visible, reviewed decision."""

from __future__ import annotations

import subprocess
import sys
from importlib.resources import files

from esper.tamiyo import policy
from esper.tamiyo.policy import demo

EXPECTED = [
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


DEMO_EXPECTED = [
    "EpisodeStats",
    "Evaluation",
    "IterationStats",
    "Op",
    "PPOConfig",
    "PPOTrainer",
    "Rollout",
    "SeedLifecycleTask",
    "Stage",
    "StepResult",
    "TaskConfig",
    "UpdateStats",
    "evaluate_policy",
    "gae",
    "train_policy",
]


def test_all_is_pinned() -> None:
    assert policy.__all__ == EXPECTED
    assert demo.__all__ == DEMO_EXPECTED


def test_the_demo_is_not_imported_with_the_package() -> None:
    """The core stays light: importing the package loads neither the demo nor matplotlib.

    (torch itself imports tqdm when it is installed.)
    """
    code = (
        "import sys, esper.tamiyo.policy;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib' "
        "or m.startswith('esper.tamiyo.policy.demo')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_every_export_exists_and_is_documented() -> None:
    for module, name in [(policy, n) for n in policy.__all__] + [(demo, n) for n in demo.__all__]:
        obj = getattr(module, name)
        if callable(obj) and not isinstance(obj, type(policy.HiddenState)):
            assert obj.__doc__, f"{name} has no docstring"


def test_package_ships_py_typed() -> None:
    assert files("esper.tamiyo.policy").joinpath("py.typed").is_file()
