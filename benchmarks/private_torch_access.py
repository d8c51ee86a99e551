"""What the private-torch shortcuts the library dropped would save (the numbers of ADR 0006).

Until ADR 0006 the LSTM bundle's single step took two shortcuts through private torch
API: `fast_layers` read `torch.nn.modules.module`'s global hook registries to call
`F.linear` and `F.layer_norm` in place of the `Linear` and `LayerNorm` modules, and
the step read the LSTM's weights from `nn.LSTM._parameters`. Both are gone: the step
calls its modules and reads the weights through the LSTM's public attributes. This
script puts each shortcut back, in a subclass of `LSTMPolicyNetwork` defined here,
and times `get_action` of bundles that differ only in their network, side by side in
one process with the bench harness (`esper.tamiyo.policy.bench.harness`), so the cost
of going public is measured rather than guessed.

Variants (the shortcuts skip every module hook, an upper bound of what they saved):

- `public`: the library as it is;
- `private_weights`: the LSTM's weights read from `nn.LSTM._parameters`;
- `functional_layers`: `F.linear` / `F.layer_norm` in place of the four module calls;
- `both`: the two shortcuts together.

Run it with `.venv/bin/python benchmarks/private_torch_access.py [--quick]`.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from esper.tamiyo.policy import LSTMPolicyBundle
from esper.tamiyo.policy.bench.harness import (
    Settings,
    git_commit,
    machine_info,
    single_thread,
    time_interleaved,
)
from esper.tamiyo.policy.inputs import HiddenState
from esper.tamiyo.policy.lstm import LSTMPolicyNetwork
from esper.tamiyo.policy.testing import random_masks

FULL = Settings(mode="full", repeats=31, target_block_s=0.02, warmup_calls=50)
QUICK = Settings(mode="quick", repeats=3, target_block_s=0.002, warmup_calls=2)
FEATURE_DIM = 32
BATCH_SIZES = (1, 32)


class PrivateWeights(LSTMPolicyNetwork):
    """Reads the LSTM's weights from `nn.LSTM._parameters` (private)."""

    def _read_cell_weights(self) -> tuple[torch.Tensor, ...]:
        params = self.lstm._parameters
        return tuple([params[name] for name in self._cell_weight_names])  # type: ignore[misc]


def _functional_step(
    network: LSTMPolicyNetwork, features: torch.Tensor, hidden: HiddenState
) -> tuple[torch.Tensor, torch.Tensor, HiddenState, torch.Tensor | None]:
    """`LSTMPolicyNetwork._single_step` with `F.linear` / `F.layer_norm` for the leaf layers."""
    embed, norm, out_norm, heads = (
        network.embed,
        network.embed_norm,
        network.lstm_norm,
        network.heads,
    )
    x = F.linear(features[:, 0], embed.weight, embed.bias)
    x = F.relu(F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps))
    w_ih, w_hh, b_ih, b_hh = network._layer_weights()
    h, c = torch.lstm_cell(x, (hidden[0][0], hidden[1][0]), w_ih, w_hh, b_ih, b_hh)
    h = F.layer_norm(h, out_norm.normalized_shape, out_norm.weight, out_norm.bias, out_norm.eps)
    z = torch.relu(F.linear(h, heads.hidden.weight, heads.hidden.bias))
    z = z.reshape(-1, heads.num_heads + 1, heads.head_hidden_dim).transpose(0, 1)
    out = torch.baddbmm(heads.out_bias, z, heads.out_weight).transpose(0, 1)
    logits, value = out[:, : heads.num_heads], out[:, heads.num_heads, 0]
    return logits.unsqueeze(1), value.unsqueeze(1), (h.unsqueeze(0), c.unsqueeze(0)), None


class FunctionalLayers(LSTMPolicyNetwork):
    """Calls `F.linear` / `F.layer_norm` instead of the leaf modules (skips their hooks)."""

    def _single_step(
        self, features: torch.Tensor, hidden: HiddenState
    ) -> tuple[torch.Tensor, torch.Tensor, HiddenState, torch.Tensor | None]:
        return _functional_step(self, features, hidden)


class Both(PrivateWeights):
    """Both shortcuts."""

    def _single_step(
        self, features: torch.Tensor, hidden: HiddenState
    ) -> tuple[torch.Tensor, torch.Tensor, HiddenState, torch.Tensor | None]:
        return _functional_step(self, features, hidden)


VARIANTS: dict[str, type[LSTMPolicyNetwork]] = {
    "public": LSTMPolicyNetwork,
    "private_weights": PrivateWeights,
    "functional_layers": FunctionalLayers,
    "both": Both,
}


def bundle_with(
    network_class: type[LSTMPolicyNetwork], reference: LSTMPolicyBundle
) -> LSTMPolicyBundle:
    """A bundle like `reference`, same weights, whose network is of `network_class`."""
    bundle = LSTMPolicyBundle(FEATURE_DIM)
    network = network_class(FEATURE_DIM, 128, 128, 1, bundle.action_space)
    network.load_state_dict(reference.network.state_dict())
    bundle.network = network
    return bundle


def measure(settings: Settings) -> dict[int, dict[str, float]]:
    """Median µs of one `get_action` step per batch size and variant."""
    torch.manual_seed(0)
    reference = LSTMPolicyBundle(FEATURE_DIM)
    bundles = {name: bundle_with(cls, reference) for name, cls in VARIANTS.items()}
    generator = torch.Generator().manual_seed(0)
    results: dict[int, dict[str, float]] = {}
    for batch in BATCH_SIZES:
        x = torch.randn(batch, FEATURE_DIM, generator=generator)
        masks = random_masks((batch,), generator=generator)
        hidden = reference.initial_hidden(batch)
        want = reference.get_action(x, masks, hidden, deterministic=True).value
        for name, bundle in bundles.items():  # the variants compute the same function
            got = bundle.get_action(x, masks, hidden, deterministic=True).value
            torch.testing.assert_close(got, want, msg=f"{name} differs from the library")
        calls: dict[str, Callable[[], object]] = {
            name: functools.partial(bundle.get_action, x, masks, hidden)
            for name, bundle in bundles.items()
        }
        timings = time_interleaved(calls, settings)
        results[batch] = {name: timing.median_us for name, timing in timings.items()}
    return results


def main(argv: list[str] | None = None) -> int:
    """Measure and print one table: µs per step and the saving against `public`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of seconds")
    args = parser.parse_args(argv)
    with single_thread():
        info = machine_info(torch.device("cpu"))
        results = measure(QUICK if args.quick else FULL)
    print(
        f"get_action, one step, check_values on; {info['processor']}, torch {info['torch']}, "
        f"{info['threads']} thread, commit {git_commit()}"
    )
    print("| variant | " + " | ".join(f"B={b} µs | saves" for b in BATCH_SIZES) + " |")
    print("|---|" + "---:|---:|" * len(BATCH_SIZES))
    for name in VARIANTS:
        cells = []
        for batch in BATCH_SIZES:
            row = results[batch]
            saved = row["public"] - row[name]
            cells.append(f"{row[name]:.1f} | {saved:+.1f} ({saved / row['public']:+.1%})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
