"""The registry: names to concrete bundle classes, with clear refusals."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from conftest import FEATURE_DIM, TinyStatelessBundle
from esper.tamiyo.policy import (
    LSTMPolicyBundle,
    NetworkOutput,
    PolicyBundle,
    PolicyInputs,
    UniformPolicyBundle,
    create_policy,
    get_policy,
    list_policies,
    load_policy,
    register_policy,
    registry,
)
from esper.tamiyo.policy.loader import TargetError, load_bundle_class
from esper.tamiyo.policy.registry import name_of


@pytest.fixture(autouse=True)
def _restore_registry() -> Iterator[None]:
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def test_lstm_is_registered() -> None:
    assert "lstm" in list_policies()
    assert get_policy("lstm") is LSTMPolicyBundle


def test_create_policy_builds_with_keyword_arguments() -> None:
    bundle = create_policy("lstm", feature_dim=FEATURE_DIM, hidden_dim=8)
    assert isinstance(bundle, LSTMPolicyBundle)
    assert bundle.hidden_dim == 8


def test_register_returns_the_class_and_lists_it_sorted() -> None:
    decorated = register_policy("aaa_tiny")(TinyStatelessBundle)
    assert decorated is TinyStatelessBundle
    assert list_policies() == sorted(list_policies())
    assert get_policy("aaa_tiny") is TinyStatelessBundle


def test_a_taken_name_is_refused() -> None:
    taken = r"policy name 'lstm' is already taken by esper\.tamiyo\.policy\.lstm\.LSTMPolicyBundle"
    with pytest.raises(ValueError, match=taken):
        register_policy("lstm")(TinyStatelessBundle)
    assert get_policy("lstm") is LSTMPolicyBundle


def test_a_reloaded_module_registers_its_class_again(tmp_path: Path) -> None:
    """A re-run notebook cell or `importlib.reload` defines the same class again.

    Bundles made from the earlier definition can still be saved under its name.
    """
    (tmp_path / "reloadable.py").write_text(
        "from esper.tamiyo.policy import UniformPolicyBundle, register_policy\n\n"
        "@register_policy('reloaded_tiny')\n"
        "class Reloaded(UniformPolicyBundle):\n"
        "    pass\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module("reloadable")
        first = module.Reloaded
        made_before = first()
        importlib.reload(module)
        assert get_policy("reloaded_tiny") is module.Reloaded is not first
        assert name_of(type(made_before)) == "reloaded_tiny"
        same = load_policy(made_before.save(tmp_path / "before.pt"))
        assert type(same) is module.Reloaded
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("reloadable", None)


def test_a_class_made_by_a_function_twice_is_two_classes_and_refused() -> None:
    def make() -> type[PolicyBundle]:
        class Local(UniformPolicyBundle):
            pass

        return Local

    register_policy("local")(make())
    with pytest.raises(ValueError, match=r"'local' is already taken by .*<locals>\.Local"):
        register_policy("local")(make())


def _two_same_named_files(tmp_path: Path) -> tuple[Path, Path]:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "bundle.py").write_text(
            "from esper.tamiyo.policy import UniformPolicyBundle, register_policy\n\n"
            "@register_policy('same_file_name')\n"
            "class Mine(UniformPolicyBundle):\n"
            "    pass\n"
        )
    return tmp_path / "a", tmp_path / "b"


def test_two_files_of_the_same_name_do_not_replace_each_other(tmp_path: Path) -> None:
    a, b = _two_same_named_files(tmp_path)
    loaded = set(sys.modules)
    try:
        first = load_bundle_class(f"{a / 'bundle.py'}:Mine")
        with pytest.raises(TargetError, match="'same_file_name' is already taken"):
            load_bundle_class(f"{b / 'bundle.py'}:Mine")
        assert get_policy("same_file_name") is first
    finally:
        for name in set(sys.modules) - loaded:
            del sys.modules[name]


def test_a_same_named_module_from_another_file_does_not_replace_a_registration(
    tmp_path: Path,
) -> None:
    """`import bundle` from one folder, then from another: two definitions, one name."""
    a, b = _two_same_named_files(tmp_path)
    try:
        sys.path.insert(0, str(a))
        first = importlib.import_module("bundle").Mine
        sys.path.remove(str(a))
        del sys.modules["bundle"]
        sys.path.insert(0, str(b))
        with pytest.raises(ValueError, match=r"'same_file_name' is already taken by bundle\.Mine"):
            importlib.import_module("bundle")
        assert get_policy("same_file_name") is first
    finally:
        for folder in (a, b):
            if str(folder) in sys.path:
                sys.path.remove(str(folder))
        sys.modules.pop("bundle", None)


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown policy 'lstn'; registered policies: .*lstm"):
        get_policy("lstn")
    with pytest.raises(ValueError, match="unknown policy 'gru'"):
        create_policy("gru", feature_dim=3)


def test_registering_a_non_bundle_is_a_type_error() -> None:
    class NotABundle:
        pass

    with pytest.raises(TypeError, match="decorates PolicyBundle subclasses"):
        register_policy("nope")(NotABundle)  # type: ignore[type-var]
    with pytest.raises(TypeError, match="decorates PolicyBundle subclasses"):
        register_policy("nope")(LSTMPolicyBundle(FEATURE_DIM))  # type: ignore[type-var]
    assert "nope" not in list_policies()


def test_registering_an_abstract_bundle_is_a_type_error_naming_the_missing_hook() -> None:
    class Half(PolicyBundle):
        pass

    with pytest.raises(TypeError, match="Half is abstract; implement _forward"):
        register_policy("half")(Half)
    with pytest.raises(TypeError, match="PolicyBundle is abstract; implement _forward"):
        register_policy("base")(PolicyBundle)
    assert "half" not in list_policies()


def test_bad_names_are_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        register_policy("")
    with pytest.raises(TypeError, match="policy name must be a str"):
        register_policy(3)  # type: ignore[arg-type]


def test_a_registered_subclass_works_end_to_end() -> None:
    @register_policy("tiny_e2e")
    class Tiny(TinyStatelessBundle):
        def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
            return super()._forward(inputs)

    bundle = create_policy("tiny_e2e", feature_dim=4)
    assert bundle.get_action(torch.randn(2, 4), None).value.shape == (2,)
