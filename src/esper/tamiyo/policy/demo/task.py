"""`SeedLifecycleTask`: a small, vectorized model of Tamiyo's job, for the demo and tests.

A host network has a few seed slots. Each step the policy picks one action over the
eight heads: which slot, and what to do there (`Op`): germinate a seed from a
blueprint (with a style and a tempo), advance a trained seed to blending (with an
alpha target, speed and curve), fossilize a blended seed into the host, prune it, or
wait. A seed's stage (`Stage`) changes with these operations and with time.

The reward needs memory. At step 0 a cue, one of `num_cues` "host conditions", is
shown once and never again; germination opens `cue_delay` steps later, and only the
blueprint the cue names makes a seed that helps the host. A policy that forgets the
cue can only guess it: chance is `1 / num_cues`.

What each choice does:

| head | effect |
|---|---|
| `slot` | the slot acted on; slots deeper in the host weigh more (`SLOT_WEIGHTS`) |
| `blueprint` | quality 1 if it is the cue's blueprint, `wrong_blueprint_quality` otherwise |
| `style` | scales quality (`STYLE_FACTORS`) |
| `tempo` | training steps before the seed can blend, and a quality factor (`TEMPOS`) |
| `alpha_target` | how much of the seed is blended in (`ALPHA_TARGETS`) |
| `alpha_speed` | blending steps (`BLEND_STEPS`) |
| `alpha_curve` | the shape of alpha while blending (`ALPHA_CURVES`) |
| `op` | the operation (`Op`) |

The host's accuracy is the sum over slots of `weight * quality * alpha` for seeds that
are blending, holding or fossilized; the reward is its change at each step, and at the
last step every seed not fossilized is discarded. So an episode's return is what its
fossilized seeds add to the host: about 3 for a policy that remembers the cue, and
less for one that guesses.

Masks follow the state and touch every head: `GERMINATE` only on an empty slot once
germination is open, `ADVANCE` only on a trained seed, `FOSSILIZE` only on a seed that
has finished blending (been evaluated), `PRUNE` only on a live seed. Blueprint, style
and tempo have a choice only when `GERMINATE` is possible, the alpha heads only when
`ADVANCE` or `SET_ALPHA_TARGET` is; otherwise they allow one action, so they add
nothing to the log-probability or the entropy. The heads are sampled independently,
so the masks make every combination of valid choices legal: each step offers one
group of slots in the same stage (`FOCUS_ORDER`), the operations valid on all of
them, and `WAIT`.

All state is `[N]` or `[N, S]` tensors for `N` environments and `S` slots, on one
device; every random draw comes from the task's own generator, so a seed fixes the
episodes whatever the policy does.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import torch
import torch.nn.functional as F

from esper.tamiyo.policy.action_space import HEAD_NAMES, ActionSpace
from esper.tamiyo.policy.masks import ActionMasks
from esper.tamiyo.policy.validation import check_positive_int

__all__ = [
    "ALPHA_CURVES",
    "ALPHA_TARGETS",
    "BLEND_STEPS",
    "FOCUS_ORDER",
    "SLOT_WEIGHTS",
    "STYLE_FACTORS",
    "TEMPOS",
    "EpisodeStats",
    "Op",
    "SeedLifecycleTask",
    "Stage",
    "StepResult",
    "TaskConfig",
]


class Op(enum.IntEnum):
    """The `op` head's actions."""

    WAIT = 0
    GERMINATE = 1
    SET_ALPHA_TARGET = 2
    PRUNE = 3
    FOSSILIZE = 4
    ADVANCE = 5


class Stage(enum.IntEnum):
    """Where a slot's seed is in its life."""

    EMPTY = 0
    TRAINING = 1
    BLENDING = 2
    HOLDING = 3
    FOSSILIZED = 4


SLOT_WEIGHTS: Final = (0.8, 1.0, 1.2)
"""How much a seed in each slot moves the host's accuracy."""
STYLE_FACTORS: Final = (0.9, 1.0, 0.8, 0.7)
"""Quality factor of each germination style."""
TEMPOS: Final = ((3, 1.0), (2, 0.9), (1, 0.75))
"""(training steps, quality factor) of each tempo."""
ALPHA_TARGETS: Final = (0.5, 0.75, 1.0)
"""Blend fraction of each alpha target."""
BLEND_STEPS: Final = (4, 3, 2, 1)
"""Steps of blending at each alpha speed."""
ALPHA_CURVES: Final = ("linear", "ease in", "ease out")
"""How alpha moves from its start to its target while blending, by alpha curve."""
FOCUS_ORDER: Final = (Stage.HOLDING, Stage.TRAINING, Stage.EMPTY, Stage.BLENDING)
"""Which stage's slots a step offers, first match wins (trained seeds for TRAINING)."""

_STAGE_OPS: Final = {
    Stage.HOLDING: (Op.FOSSILIZE, Op.PRUNE),
    Stage.TRAINING: (Op.ADVANCE, Op.PRUNE),
    Stage.EMPTY: (Op.GERMINATE,),
    Stage.BLENDING: (Op.SET_ALPHA_TARGET, Op.PRUNE),
}
_NO_CHOICE: Final = 0  # the one action a head allows when its choice means nothing


@dataclass(frozen=True, slots=True)
class TaskConfig:
    """The shape of a `SeedLifecycleTask`.

    Attributes:
        episode_steps: Steps per episode, `T`.
        num_cues: Host conditions the cue can name; each has its own right blueprint,
            so chance on the memory decision is `1 / num_cues`.
        cue_delay: Inclusive range of the steps between the cue (step 0) and the
            step germination opens; drawn per episode.
        action_space: Head sizes. The slot head sets the number of slots (at most
            `len(SLOT_WEIGHTS)`); blueprints `1..num_cues` are the candidates.
        wrong_blueprint_quality: Quality of a seed from a blueprint other than the
            cue's (the cue's gives 1), in [-1, 1). Positive, guessing still pays, so
            a memoryless policy learns the lifecycle; at -1, "never germinate" is a
            local optimum PPO finds first (ADR 0005).
    """

    episode_steps: int = 16
    num_cues: int = 4
    cue_delay: tuple[int, int] = (3, 5)
    action_space: ActionSpace = ActionSpace()
    wrong_blueprint_quality: float = 0.25

    def __post_init__(self) -> None:
        check_positive_int(self.episode_steps, "episode_steps", "TaskConfig")
        check_positive_int(self.num_cues, "num_cues", "TaskConfig")
        space = self.action_space
        expected = {
            "style": len(STYLE_FACTORS),
            "tempo": len(TEMPOS),
            "alpha_target": len(ALPHA_TARGETS),
            "alpha_speed": len(BLEND_STEPS),
            "alpha_curve": len(ALPHA_CURVES),
            "op": len(Op),
        }
        for head, size in expected.items():
            if space.size_of(head) != size:
                raise ValueError(
                    f"TaskConfig: the task uses {size} {head} actions, "
                    f"the action space has {space.size_of(head)}"
                )
        if not 1 <= space.slot <= len(SLOT_WEIGHTS):
            raise ValueError(
                f"TaskConfig: the task has 1 to {len(SLOT_WEIGHTS)} slots, "
                f"the action space has slot={space.slot}"
            )
        if not 2 <= self.num_cues < space.blueprint:
            raise ValueError(
                f"TaskConfig: num_cues must be in [2, {space.blueprint - 1}] (one blueprint per cue, "
                f"and blueprint 0 for no choice), "
                f"got {self.num_cues}"
            )
        quality = self.wrong_blueprint_quality
        if isinstance(quality, bool) or not isinstance(quality, int | float):
            raise TypeError(
                f"TaskConfig: wrong_blueprint_quality must be a number, got {quality!r}"
            )
        if not -1 <= quality < 1:
            raise ValueError(
                f"TaskConfig: wrong_blueprint_quality must be in [-1, 1), got {quality}: "
                "the cue's blueprint (quality 1) must be the best"
            )
        low, high = self.cue_delay
        if not 1 <= low <= high:
            raise ValueError(f"TaskConfig: cue_delay must be 1 <= low <= high, got {low, high}")
        if self.episode_steps < high + 4:
            raise ValueError(
                f"TaskConfig: episode_steps={self.episode_steps} leaves no time to germinate, "
                f"train, blend and fossilize after a cue delay of up to {high}; "
                f"use at least {high + 4}"
            )

    @property
    def num_slots(self) -> int:
        """`S`."""
        return self.action_space.slot

    @property
    def feature_dim(self) -> int:
        """Width `F` of the features: cue, time, germination open, 8 numbers per slot."""
        return self.num_cues + 2 + self.num_slots * (len(Stage) + 3)

    @property
    def best_return(self) -> float:
        """The largest episode return.

        Every slot fossilized from the cue's blueprint, with the best style and tempo,
        fully blended.
        """
        quality = max(STYLE_FACTORS) * max(factor for _, factor in TEMPOS)
        return sum(SLOT_WEIGHTS[: self.num_slots]) * quality * max(ALPHA_TARGETS)

    @property
    def chance(self) -> float:
        """Success rate on the memory decision of a policy that guesses the blueprint."""
        return 1.0 / self.num_cues


@dataclass(frozen=True, slots=True, eq=False)
class EpisodeStats:
    """Totals of the episodes that ended at one step, `[N]` each, valid where `done`.

    Attributes:
        done: Environments whose episode ended at this step.
        episode_return: Summed reward of the episode.
        success: The episode's first germination used the cue's blueprint.
        invalid_actions: Actions the task refused in the episode (taken as `WAIT`).
    """

    done: torch.Tensor
    episode_return: torch.Tensor
    success: torch.Tensor
    invalid_actions: torch.Tensor


@dataclass(frozen=True, slots=True, eq=False)
class StepResult:
    """What `SeedLifecycleTask.step` returns.

    Attributes:
        features: `[N, F]` float32 features of the next step (of a new episode where
            `done`).
        masks: The next step's `ActionMasks`, `[N, A_h]` per head.
        reward: `[N]` reward of the step just taken.
        done: `[N]` bool, the episode ended with this step; the task started a new one.
        episodes: Totals of the episodes that ended.
    """

    features: torch.Tensor
    masks: ActionMasks
    reward: torch.Tensor
    done: torch.Tensor
    episodes: EpisodeStats


class SeedLifecycleTask:
    """`N` environments of the seed-lifecycle task, stepped together.

    All episodes have `config.episode_steps` steps and start together, so they end
    together too; the next episode starts at once.

    Example:
        >>> task = SeedLifecycleTask(num_envs=2, seed=0)
        >>> features, masks = task.reset()
        >>> features.shape, masks.op.tolist()[0]  # only WAIT while the cue is shown
        (torch.Size([2, 30]), [True, False, False, False, False, False])

    Args:
        num_envs: `N`.
        config: The task's shape.
        seed: Seeds the task's generator: cues and cue delays.
        device: Where the state lives.
    """

    def __init__(
        self,
        num_envs: int,
        config: TaskConfig = TaskConfig(),
        *,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        check_positive_int(num_envs, "num_envs", "SeedLifecycleTask")
        self.config = config
        self.num_envs = num_envs
        self.device = torch.device(device)
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        n, s, dev = num_envs, config.num_slots, self.device
        self._rows = torch.arange(n, device=dev)
        self._slot_weights = torch.tensor(SLOT_WEIGHTS[:s], device=dev)  # [S]
        self._style_factors = torch.tensor(STYLE_FACTORS, device=dev)
        self._tempo_steps = torch.tensor([steps for steps, _ in TEMPOS], device=dev)
        self._tempo_factors = torch.tensor([factor for _, factor in TEMPOS], device=dev)
        self._alpha_targets = torch.tensor(ALPHA_TARGETS, device=dev)
        self._blend_steps = torch.tensor(BLEND_STEPS, device=dev, dtype=torch.float32)
        self._candidates = torch.zeros(config.action_space.blueprint, dtype=torch.bool, device=dev)
        self._candidates[1 : config.num_cues + 1] = True
        self._op_of_stage = self._stage_op_table()  # [len(Stage), |Op|]
        # Episode state: [N] or [N, S].
        self.t = torch.zeros(n, dtype=torch.long, device=dev)
        self.cue = torch.zeros(n, dtype=torch.long, device=dev)
        self.open_step = torch.zeros(n, dtype=torch.long, device=dev)
        self.stage = torch.zeros(n, s, dtype=torch.long, device=dev)
        self.timer = torch.zeros(n, s, dtype=torch.long, device=dev)
        self.quality = torch.zeros(n, s, device=dev)
        self.alpha = torch.zeros(n, s, device=dev)
        self.blend_from = torch.zeros(n, s, device=dev)
        self.blend_to = torch.zeros(n, s, device=dev)
        self.blend_progress = torch.zeros(n, s, device=dev)
        self.blend_rate = torch.zeros(n, s, device=dev)
        self.blend_curve = torch.zeros(n, s, dtype=torch.long, device=dev)
        self.first_blueprint = torch.zeros(n, dtype=torch.long, device=dev)
        self.episode_return = torch.zeros(n, device=dev)
        self.invalid_actions = torch.zeros(n, dtype=torch.long, device=dev)
        self._masks = self.reset()[1]

    # ------------------------------------------------------------------ public API

    def reset(self) -> tuple[torch.Tensor, ActionMasks]:
        """Start a new episode in every environment.

        Returns:
            `[N, F]` features and the first step's masks.
        """
        self._start_episodes(torch.ones(self.num_envs, dtype=torch.bool, device=self.device))
        self._masks = self._compute_masks()
        return self.features(), self._masks

    def right_blueprint(self) -> torch.Tensor:
        """`[N]` the blueprint the current episode's cue names."""
        return self.cue + 1

    def features(self) -> torch.Tensor:
        """`[N, F]` float32 features of the current step.

        The cue (one-hot, at step 0 only), the time, whether germination is open, and
        per slot its stage (one-hot), training timer, alpha and measured contribution.
        """
        cfg = self.config
        shown = (self.t == 0).unsqueeze(1)  # [N, 1]
        cue = F.one_hot(self.cue, cfg.num_cues).float() * shown  # [N, K]
        time = (self.t.float() / cfg.episode_steps).unsqueeze(1)  # [N, 1]
        is_open = (self.t >= self.open_step).float().unsqueeze(1)  # [N, 1]
        stage = F.one_hot(self.stage, len(Stage)).float()  # [N, S, 5]
        per_slot = torch.cat(
            (
                stage,
                (self.timer.float() / 3).unsqueeze(2),
                self.alpha.unsqueeze(2),
                self._contribution().unsqueeze(2),
            ),
            dim=2,
        )  # [N, S, 8]
        return torch.cat((cue, time, is_open, per_slot.flatten(1)), dim=1)  # [N, F]

    def masks(self) -> ActionMasks:
        """The valid actions of the current step, `[N, A_h]` per head."""
        return self._masks

    def _compute_masks(self) -> ActionMasks:
        space, n = self.config.action_space, self.num_envs
        in_stage = self._actionable_slots()  # [N, len(Stage), S]
        focus = torch.zeros_like(in_stage[:, 0])  # [N, S]
        focus_stage = torch.full((n,), -1, dtype=torch.long, device=self.device)
        for stage in reversed(FOCUS_ORDER):  # the first stage in FOCUS_ORDER wins
            has = in_stage[:, stage].any(dim=1)  # [N]
            focus = torch.where(has.unsqueeze(1), in_stage[:, stage], focus)
            focus_stage = torch.where(has, stage, focus_stage)
        none = focus_stage < 0  # [N]: only WAIT
        slot = focus.clone()
        slot[:, 0] |= none
        op = self._op_of_stage[focus_stage.clamp(min=0)] & ~none.unsqueeze(1)  # [N, |Op|]
        op[:, Op.WAIT] = True
        germinate = op[:, Op.GERMINATE].unsqueeze(1)  # [N, 1]
        blend = (op[:, Op.ADVANCE] | op[:, Op.SET_ALPHA_TARGET]).unsqueeze(1)  # [N, 1]
        return ActionMasks(
            slot=slot,
            blueprint=_choice_or_default(self._candidates.expand(n, -1), germinate),
            style=_choice_or_default(self._all(n, space.style), germinate),
            tempo=_choice_or_default(self._all(n, space.tempo), germinate),
            alpha_target=_choice_or_default(self._all(n, space.alpha_target), blend),
            alpha_speed=_choice_or_default(self._all(n, space.alpha_speed), blend),
            alpha_curve=_choice_or_default(self._all(n, space.alpha_curve), blend),
            op=op,
        )

    def step(self, action: Mapping[str, torch.Tensor]) -> StepResult:
        """Apply one action per environment, let a step of time pass, and observe.

        An action the task's rules refuse, or outside the masks this step offered, is
        counted as invalid and taken as `WAIT`; a policy that respects the masks never
        takes one.

        Args:
            action: Head name to `[N]` int64 actions, as `PolicyBundle.get_action`
                returns them.

        Returns:
            The next step's features and masks, the reward, and the episodes that ended.

        Raises:
            ValueError: `action` misses a head, or a head has the wrong shape or dtype;
                nothing changed.
        """
        for head in HEAD_NAMES:
            if head not in action:
                raise ValueError(f"SeedLifecycleTask.step: action has no {head!r} head")
            taken = action[head]
            if taken.shape != (self.num_envs,):
                raise ValueError(
                    f"SeedLifecycleTask.step: action[{head!r}] must be [{self.num_envs}], "
                    f"got {list(taken.shape)}"
                )
            if taken.is_floating_point() or taken.is_complex() or taken.dtype == torch.bool:
                raise ValueError(
                    f"SeedLifecycleTask.step: action[{head!r}] must hold integers, "
                    f"got {taken.dtype}"
                )
        before = self._accuracy()  # [N]
        num_slots = self.config.num_slots
        asked = F.one_hot(action["slot"].clamp(0, num_slots - 1), num_slots).bool()  # [N, S]
        valid = _within_masks(action, self._masks) & self._legal(action["op"], asked)  # [N]
        self.invalid_actions += (~valid).long()
        # A refused row waits: action 0 of every head (WAIT, slot 0, ...), always in range.
        safe = {head: action[head].long().masked_fill(~valid, 0) for head in HEAD_NAMES}  # [N]
        slot = F.one_hot(safe["slot"], num_slots).bool()  # [N, S]
        op = safe["op"]  # [N]
        self._germinate(slot & (op == Op.GERMINATE).unsqueeze(1), safe)
        self._start_blend(
            slot & ((op == Op.ADVANCE) | (op == Op.SET_ALPHA_TARGET)).unsqueeze(1), safe
        )
        self._set_stage(slot & (op == Op.FOSSILIZE).unsqueeze(1), Stage.FOSSILIZED)
        self._clear(slot & (op == Op.PRUNE).unsqueeze(1))
        self._pass_time()
        self.t += 1
        done = self.t >= self.config.episode_steps  # [N]
        self._clear(done.unsqueeze(1) & (self.stage != Stage.FOSSILIZED))  # discard the rest
        reward = self._accuracy() - before  # [N]
        self.episode_return += reward
        episodes = EpisodeStats(
            done=done,
            episode_return=self.episode_return.clone(),
            success=self.first_blueprint == self.right_blueprint(),
            invalid_actions=self.invalid_actions.clone(),
        )
        self._start_episodes(done)
        self._masks = self._compute_masks()
        return StepResult(self.features(), self._masks, reward, done, episodes)

    # ------------------------------------------------------------------ internals

    def _all(self, n: int, size: int) -> torch.Tensor:
        return torch.ones(n, size, dtype=torch.bool, device=self.device)

    def _stage_op_table(self) -> torch.Tensor:
        table = torch.zeros(len(Stage), len(Op), dtype=torch.bool, device=self.device)
        for stage, ops in _STAGE_OPS.items():
            for op in ops:
                table[stage, op] = True
        return table

    def _legal(self, op: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """`[N]` bool: the task's rules allow `op` `[N]` on the one-hot `slot` `[N, S]`.

        Checked apart from the masks, which are derived from the same rules: a masks
        bug shows up as invalid actions instead of silently bending the rules.
        """
        stage = (self.stage * slot).sum(dim=1)  # [N]
        timer = (self.timer * slot).sum(dim=1)  # [N]
        is_open = self.t >= self.open_step
        live = (stage == Stage.TRAINING) | (stage == Stage.BLENDING) | (stage == Stage.HOLDING)
        legal = torch.stack(
            (
                torch.ones_like(is_open),  # WAIT
                (stage == Stage.EMPTY) & is_open,  # GERMINATE
                stage == Stage.BLENDING,  # SET_ALPHA_TARGET
                live,  # PRUNE
                stage == Stage.HOLDING,  # FOSSILIZE
                (stage == Stage.TRAINING) & (timer == 0),  # ADVANCE
            ),
            dim=1,
        )  # [N, |Op|]
        return legal.gather(1, op.clamp(0, len(Op) - 1).unsqueeze(1)).squeeze(1)

    def _actionable_slots(self) -> torch.Tensor:
        """`[N, len(Stage), S]`: slots where that stage's operations are possible now."""
        is_open = (self.t >= self.open_step).unsqueeze(1)  # [N, 1]
        stages = [self.stage == stage for stage in Stage]
        stages[Stage.EMPTY] = stages[Stage.EMPTY] & is_open
        stages[Stage.TRAINING] = stages[Stage.TRAINING] & (self.timer == 0)
        stages[Stage.FOSSILIZED] = torch.zeros_like(stages[Stage.FOSSILIZED])
        return torch.stack(stages, dim=1)

    def _contribution(self) -> torch.Tensor:
        """`[N, S]` what each slot's seed adds to the host's accuracy now."""
        return self._slot_weights * self.quality * self.alpha

    def _accuracy(self) -> torch.Tensor:
        return self._contribution().sum(dim=1)  # [N]

    def _germinate(self, where: torch.Tensor, action: Mapping[str, torch.Tensor]) -> None:
        """Start a seed in the `[N, S]` slots `where`, from the action's blueprint."""
        fits = action["blueprint"] == self.right_blueprint()  # [N]
        quality = (
            torch.where(fits, 1.0, self.config.wrong_blueprint_quality)
            * self._style_factors[action["style"]]
            * self._tempo_factors[action["tempo"]]
        )  # [N]
        first = where.any(dim=1) & (self.first_blueprint == 0)  # [N]
        self.first_blueprint = torch.where(first, action["blueprint"], self.first_blueprint)
        self._set_stage(where, Stage.TRAINING)
        self.timer = torch.where(where, self._tempo_steps[action["tempo"]].unsqueeze(1), self.timer)
        self.quality = torch.where(where, quality.unsqueeze(1), self.quality)

    def _start_blend(self, where: torch.Tensor, action: Mapping[str, torch.Tensor]) -> None:
        """Blend the seeds in `where` from their alpha now to the action's target."""
        target = self._alpha_targets[action["alpha_target"]].unsqueeze(1)  # [N, 1]
        rate = (1 / self._blend_steps[action["alpha_speed"]]).unsqueeze(1)  # [N, 1]
        self._set_stage(where, Stage.BLENDING)
        self.blend_from = torch.where(where, self.alpha, self.blend_from)
        self.blend_to = torch.where(where, target, self.blend_to)
        self.blend_progress = torch.where(where, 0.0, self.blend_progress)
        self.blend_rate = torch.where(where, rate, self.blend_rate)
        self.blend_curve = torch.where(where, action["alpha_curve"].unsqueeze(1), self.blend_curve)

    def _pass_time(self) -> None:
        """Training counts down; blending moves alpha along its curve, then holds."""
        training = self.stage == Stage.TRAINING
        self.timer = torch.where(training, (self.timer - 1).clamp(min=0), self.timer)
        blending = self.stage == Stage.BLENDING
        progress = (self.blend_progress + self.blend_rate).clamp(max=1.0)  # [N, S]
        shaped = torch.stack((progress, progress**2, 1 - (1 - progress) ** 2), dim=2)
        eased = shaped.gather(2, self.blend_curve.unsqueeze(2)).squeeze(2)  # [N, S]
        alpha = self.blend_from + (self.blend_to - self.blend_from) * eased
        self.blend_progress = torch.where(blending, progress, self.blend_progress)
        self.alpha = torch.where(blending, alpha, self.alpha)
        self._set_stage(blending & (progress >= 1.0), Stage.HOLDING)

    def _set_stage(self, where: torch.Tensor, stage: Stage) -> None:
        self.stage = torch.where(where, int(stage), self.stage)

    def _clear(self, where: torch.Tensor) -> None:
        """Empty the `[N, S]` slots `where`."""
        self._set_stage(where, Stage.EMPTY)
        for name in ("timer", "quality", "alpha", "blend_from", "blend_to", "blend_progress"):
            value = getattr(self, name)
            setattr(self, name, value.masked_fill(where, 0))

    def _start_episodes(self, where: torch.Tensor) -> None:
        """Reset the `[N]` environments `where`: a fresh cue and cue delay, empty slots."""
        low, high = self.config.cue_delay
        cue = torch.randint(
            self.config.num_cues, (self.num_envs,), generator=self._generator, device=self.device
        )
        delay = torch.randint(
            low, high + 1, (self.num_envs,), generator=self._generator, device=self.device
        )
        self.cue = torch.where(where, cue, self.cue)
        self.open_step = torch.where(where, delay, self.open_step)
        self.t = self.t.masked_fill(where, 0)
        self._clear(where.unsqueeze(1).expand_as(self.stage))
        self.first_blueprint = self.first_blueprint.masked_fill(where, 0)
        self.episode_return = self.episode_return.masked_fill(where, 0.0)
        self.invalid_actions = self.invalid_actions.masked_fill(where, 0)


def _choice_or_default(choices: torch.Tensor, has_choice: torch.Tensor) -> torch.Tensor:
    """`choices` `[N, A]` where `has_choice` `[N, 1]`, else only action `_NO_CHOICE`."""
    default = torch.zeros_like(choices)
    default[:, _NO_CHOICE] = True
    return torch.where(has_choice, choices, default)


def _within_masks(action: Mapping[str, torch.Tensor], masks: ActionMasks) -> torch.Tensor:
    """`[N]` bool: every head's action is in range and allowed by its mask."""
    valid = torch.ones_like(action["op"], dtype=torch.bool)
    for head in HEAD_NAMES:
        mask = getattr(masks, head)  # [N, A]
        taken = action[head]  # [N]
        in_range = (taken >= 0) & (taken < mask.shape[1])
        allowed = mask.gather(1, taken.clamp(0, mask.shape[1] - 1).unsqueeze(1)).squeeze(1)
        valid &= in_range & allowed
    return valid
