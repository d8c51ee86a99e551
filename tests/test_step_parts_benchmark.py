"""The script behind performance.md's table of required parts runs, and its parts compute the library's numbers.

Timings are never asserted: only that every case is reported, and that the parts it
times alone are the tensor work the library does (same log-probabilities, entropies,
valid actions), so the sum it prints is a sum of real parts.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from conftest import BENCHMARKS, imported_script
from esper.tamiyo.policy import HEAD_NAMES
from esper.tamiyo.policy.bench.suite import build_bundles, make_case, network_step
from esper.tamiyo.policy.layout import HeadLayout

SCRIPT = BENCHMARKS / "step_parts.py"


@pytest.fixture(scope="module")
def script() -> Iterator[ModuleType]:
    with imported_script(SCRIPT, "_step_parts") as module:
        yield module


def test_a_quick_run_reports_every_quick_case(
    script: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert script.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for title in ("get_action B=1:", "get_action B=32:", "training step B=8, T=16:"):
        assert title in out, title
    assert out.count("required parts") == 3
    for part in ("network", "normalize", "value_checks", "mask_and_sample", "scoring", "ppo_loss"):
        assert f"  {part} " in out, part


def test_scoring_alone_gives_what_evaluate_actions_gives(script: ModuleType) -> None:
    torch.manual_seed(0)
    bundles = build_bundles(script.FEATURE_DIM, torch.device("cpu"))
    new = bundles.new
    case = make_case(
        new, (3, 5), script.FEATURE_DIM, torch.Generator().manual_seed(2), with_actions=True
    )
    assert case.actions is not None
    logits = network_step(new, case.features, case)[0]
    valid = new._normalize_inputs(case.features, case.masks, case.hidden).valid
    actions = torch.stack([case.actions[head] for head in HEAD_NAMES], -1)
    chosen, entropy = script._scoring(
        logits, valid, actions, HeadLayout(new.action_space, new.device)
    )
    with torch.no_grad():
        out = new.evaluate_actions(case.features, case.actions, case.masks, case.hidden)
    for index, head in enumerate(HEAD_NAMES):
        torch.testing.assert_close(chosen[..., index], out.log_prob[head])
        torch.testing.assert_close(entropy[..., index], out.entropy[head])


def test_mask_and_sample_alone_takes_valid_actions_with_their_log_probs(script: ModuleType) -> None:
    torch.manual_seed(0)
    bundles = build_bundles(script.FEATURE_DIM, torch.device("cpu"))
    new = bundles.new
    case = make_case(new, (64,), script.FEATURE_DIM, torch.Generator().manual_seed(3))
    logits = network_step(new, case.features.unsqueeze(1), case)[0]
    valid = new._normalize_inputs(case.features, case.masks, case.hidden).valid
    actions, log_prob = script._mask_and_sample(
        logits, valid, HeadLayout(new.action_space, new.device)
    )
    assert bool(valid.gather(-1, actions.unsqueeze(-1)).all())
    chosen = {head: actions[:, 0, index] for index, head in enumerate(HEAD_NAMES)}
    with torch.no_grad():
        scored = new.evaluate_actions(case.features, chosen, case.masks, case.hidden)
    for index, head in enumerate(HEAD_NAMES):
        torch.testing.assert_close(
            log_prob[..., index].reshape(-1), scored.log_prob[head].reshape(-1)
        )
