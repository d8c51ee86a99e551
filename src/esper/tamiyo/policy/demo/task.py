"""`SeedLifecycleTask`: a small, vectorized model of Tamiyo's job, for the demo and tests.

A host network has a few seed slots. Each step the policy picks one action: an
operation (`Op`) and the heads Tamiyo's table (`TAMIYO_HIERARCHY`) says it uses. A
seed's stage (`Stage`) changes with these operations and with time:

| op | heads it uses | legal on | what it does |
|---|---|---|---|
| `WAIT` | none | always | nothing |
| `GERMINATE` | slot, blueprint, style, tempo, alpha_target | an empty slot, once germination is open | starts a seed training; the alpha target is stored for its blend |
| `SET_ALPHA_TARGET` | slot, style, alpha_target, alpha_speed, alpha_curve | a blending or holding seed | restyles it and blends it again, from its alpha now to the new target, on the chosen schedule |
| `PRUNE` | slot, alpha_speed, alpha_curve | a live seed (training, blending, holding) | ramps its alpha down to 0 on the chosen schedule, then empties the slot |
| `FOSSILIZE` | slot | a holding seed (one that has blended) | fixes it into the host for good |
| `ADVANCE` | slot | a trained seed (training, timer at 0) | blends it to its stored target on the default schedule (`DEFAULT_SCHEDULE`) |

The reward needs memory. At step 0 a cue, one of `num_cues` "host conditions", is
shown once and never again; germination opens `cue_delay` steps later, and only the
blueprint the cue names makes a seed that fits the host. A policy that forgets the
cue can only guess it: chance is `1 / num_cues`.

Every head's choice matters for each op that uses it:

| head | effect |
|---|---|
| `slot` | the slot acted on; slots deeper in the host weigh more (`SLOT_WEIGHTS`) |
| `blueprint` | fit 1 if it is the cue's blueprint, `wrong_blueprint_quality` otherwise |
| `style` | a quality factor (`STYLE_FACTORS`), set at germination, replaced by `SET_ALPHA_TARGET` |
| `tempo` | training steps before the seed can advance, and a quality factor (`TEMPOS`) |
| `alpha_target` | how much of the seed is blended in (`ALPHA_TARGETS`) |
| `alpha_speed` | steps of the blend or prune (`BLEND_STEPS`); a faster one is harsher (`SPEED_FACTORS`) |
| `alpha_curve` | the shape of alpha on the way (`ALPHA_CURVES`); a curved one is harsher (`CURVE_FACTORS`) |
| `op` | the operation (`Op`) |

A schedule's factor is its speed's times its curve's. A seed's quality is its fit
times its style's, its tempo's and the factor of the schedule of its last blend; it
adds `weight * quality * alpha` to the host's accuracy while blending, holding or
fossilized. A prune shocks the host: it loses `(1 - factor) * what the seed added`,
for good, so only the gentlest schedule (4 steps, linear) is free. The reward is the
change of the host's accuracy at each step, and at the last step every seed not
fossilized is discarded. So an episode's return is what its fossilized seeds add to
the host, less the shocks: 3 at best, for a policy that remembers the cue, less for
one that guesses.

The masks say exactly what the rules allow. The `op` mask offers every op that is
legal on some slot (and `WAIT`); under Tamiyo's hierarchical space
(`ActionSpace.tamiyo()`, the default) `slot_by_op`, `[N, |Op|, S]`, says on which
slots each op is legal, so the policy can germinate one seed and fossilize another
from the same state, and the blueprint mask offers the cue candidates. Under a flat
space (`ActionSpace()`, heads sampled independently), the task offers the union
instead: a slot is offered if some offered op is legal on it, and a head has a choice
only when some offered op uses it. A policy can then pick an op and a slot that do
not go together: the task takes that as `WAIT` and counts an illegal combination
(`EpisodeStats.illegal_combinations`), which is not an invalid action.

All state is `[N]` or `[N, S]` tensors for `N` environments and `S` slots, on one
device; every random draw comes from the task's own generator, so a seed fixes the
episodes whatever the policy does.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import torch
import torch.nn.functional as F

from esper.tamiyo.policy.action_space import HEAD_NAMES, TAMIYO_HIERARCHY, ActionSpace
from esper.tamiyo.policy.extra_inputs import ExtraInput
from esper.tamiyo.policy.masks import ActionMasks
from esper.tamiyo.policy.validation import check_positive_int

__all__ = [
    "ALPHA_CURVES",
    "ALPHA_TARGETS",
    "BLEND_STEPS",
    "CURVE_FACTORS",
    "DEFAULT_SCHEDULE",
    "SLOT_WEIGHTS",
    "SPEED_FACTORS",
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
    """The `op` head's actions, in `TAMIYO_HIERARCHY.ops` order."""

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
    PRUNING = 5


SLOT_WEIGHTS: Final = (0.8, 1.0, 1.2)
"""How much a seed in each slot moves the host's accuracy."""
STYLE_FACTORS: Final = (0.9, 1.0, 0.8, 0.7)
"""Quality factor of each style."""
TEMPOS: Final = ((3, 1.0), (2, 0.9), (1, 0.75))
"""(training steps, quality factor) of each tempo."""
ALPHA_TARGETS: Final = (0.5, 0.75, 1.0)
"""Blend fraction of each alpha target."""
BLEND_STEPS: Final = (4, 3, 2, 1)
"""Steps of a blend or prune at each alpha speed."""
SPEED_FACTORS: Final = (1.0, 0.95, 0.9, 0.8)
"""How gentle each alpha speed is: the faster, the harsher."""
ALPHA_CURVES: Final = ("linear", "ease in", "ease out")
"""How alpha moves from its start to its target, by alpha curve."""
CURVE_FACTORS: Final = (1.0, 0.9, 0.8)
"""How gentle each alpha curve is: linear spreads the change evenly."""
DEFAULT_SCHEDULE: Final = (0, 0)
"""The (alpha speed, alpha curve) of the blend `ADVANCE` starts: 4 steps, linear."""

_OPS_USING: Final = {
    head: tuple(op for op in Op if head in TAMIYO_HIERARCHY.uses(op)) for head in HEAD_NAMES
}  # head -> the ops that use it ("op" itself: none)


@dataclass(frozen=True, slots=True)
class TaskConfig:
    """The shape of a `SeedLifecycleTask`.

    Attributes:
        episode_steps: Steps per episode, `T`.
        num_cues: Host conditions the cue can name; each has its own right blueprint,
            so chance on the memory decision is `1 / num_cues`.
        cue_delay: Inclusive range of the steps between the cue (step 0) and the
            step germination opens; drawn per episode.
        action_space: Head sizes, and how the policy samples them: Tamiyo's
            hierarchical space (`ActionSpace.tamiyo()`, the default) gets masks per
            op; a flat one the union masks, and illegal combinations taken as `WAIT`.
            The slot head sets the number of slots (at most `len(SLOT_WEIGHTS)`);
            blueprints `1..num_cues` are the candidates.
        wrong_blueprint_quality: Fit of a seed from a blueprint other than the cue's
            (the cue's fits at 1), in [-1, 1). Positive, guessing still pays, so a
            memoryless policy learns the lifecycle; at -1, "never germinate" is a
            local optimum PPO finds first (ADR 0005).
    """

    episode_steps: int = 16
    num_cues: int = 4
    cue_delay: tuple[int, int] = (3, 5)
    action_space: ActionSpace = ActionSpace.tamiyo()
    wrong_blueprint_quality: float = 0.25

    def __post_init__(self) -> None:
        check_positive_int(self.episode_steps, "episode_steps", "TaskConfig")
        check_positive_int(self.num_cues, "num_cues", "TaskConfig")
        space = self.action_space
        if space.hierarchy is not None and space.hierarchy != TAMIYO_HIERARCHY:
            raise ValueError(
                "TaskConfig: the task follows Tamiyo's table (TAMIYO_HIERARCHY); use "
                "ActionSpace.tamiyo(...) or a flat ActionSpace(...)"
            )
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
                "the cue's blueprint (fit 1) must be the best"
            )
        low, high = self.cue_delay
        if not 1 <= low <= high:
            raise ValueError(f"TaskConfig: cue_delay must be 1 <= low <= high, got {low, high}")
        if self.episode_steps < high + 4 + BLEND_STEPS[DEFAULT_SCHEDULE[0]]:
            raise ValueError(
                f"TaskConfig: episode_steps={self.episode_steps} leaves no time to germinate, "
                f"train, blend and fossilize after a cue delay of up to {high}; "
                f"use at least {high + 4 + BLEND_STEPS[DEFAULT_SCHEDULE[0]]}"
            )

    @property
    def hierarchical(self) -> bool:
        """Whether the task offers masks per op (else the union masks)."""
        return self.action_space.hierarchy is not None

    @property
    def num_slots(self) -> int:
        """`S`."""
        return self.action_space.slot

    @property
    def feature_dim(self) -> int:
        """Width `F` of the features: cue, time, germination open, 9 numbers per slot."""
        return self.num_cues + 2 + self.num_slots * (len(Stage) + 3)

    @property
    def best_return(self) -> float:
        """The largest episode return.

        Every slot fossilized from the cue's blueprint, with the best style and tempo,
        fully blended on the default schedule.
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
        invalid_actions: Actions outside the masks offered, or that the rules refused
            under masks that said they were legal (taken as `WAIT`). 0 for a policy
            that respects the masks, in either kind of space.
        illegal_combinations: Under a flat space only: actions within the union masks
            whose op and slot do not go together (taken as `WAIT`).
    """

    done: torch.Tensor
    episode_return: torch.Tensor
    success: torch.Tensor
    invalid_actions: torch.Tensor
    illegal_combinations: torch.Tensor


@dataclass(frozen=True, slots=True, eq=False)
class StepResult:
    """What `SeedLifecycleTask.step` returns.

    Attributes:
        features: `[N, F]` float32 features of the next step (of a new episode where
            `done`).
        masks: The next step's `ActionMasks`: `[N, A_h]` per head, and `slot_by_op`
            `[N, |Op|, S]` under a hierarchical space.
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
        (torch.Size([2, 33]), [True, False, False, False, False, False])
        >>> masks.slot_by_op.shape  # [N, |Op|, S]: the slots each op is legal on
        torch.Size([2, 6, 3])

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
        self._slot_weights = torch.tensor(SLOT_WEIGHTS[:s], device=dev)  # [S]
        self._style_factors = torch.tensor(STYLE_FACTORS, device=dev)
        self._tempo_steps = torch.tensor([steps for steps, _ in TEMPOS], device=dev)
        self._tempo_factors = torch.tensor([factor for _, factor in TEMPOS], device=dev)
        self._alpha_targets = torch.tensor(ALPHA_TARGETS, device=dev)
        self._blend_steps = torch.tensor(BLEND_STEPS, device=dev)
        self._speed_factors = torch.tensor(SPEED_FACTORS, device=dev)
        self._curve_factors = torch.tensor(CURVE_FACTORS, device=dev)
        self._candidates = torch.zeros(config.action_space.blueprint, dtype=torch.bool, device=dev)
        self._candidates[1 : config.num_cues + 1] = True
        self._used = torch.tensor(TAMIYO_HIERARCHY.relevance_table(), device=dev)  # [|Op|, H]
        # Episode state: [N] or [N, S].
        self.t = torch.zeros(n, dtype=torch.long, device=dev)
        self.cue = torch.zeros(n, dtype=torch.long, device=dev)
        self.open_step = torch.zeros(n, dtype=torch.long, device=dev)
        self.stage = torch.zeros(n, s, dtype=torch.long, device=dev)
        self.timer = torch.zeros(n, s, dtype=torch.long, device=dev)
        self.fit = torch.zeros(n, s, device=dev)
        self.style = torch.zeros(n, s, device=dev)  # the style's factor
        self.tempo = torch.zeros(n, s, device=dev)  # the tempo's factor
        self.schedule = torch.zeros(n, s, device=dev)  # the last blend's schedule factor
        self.target = torch.zeros(n, s, device=dev)  # stored at germination
        self.alpha = torch.zeros(n, s, device=dev)
        self.blend_from = torch.zeros(n, s, device=dev)
        self.blend_to = torch.zeros(n, s, device=dev)
        self.blend_step = torch.zeros(n, s, dtype=torch.long, device=dev)
        self.blend_length = torch.ones(n, s, dtype=torch.long, device=dev)
        self.blend_curve = torch.zeros(n, s, dtype=torch.long, device=dev)
        self.shock = torch.zeros(n, device=dev)  # what prunes cost the host so far
        self.first_blueprint = torch.zeros(n, dtype=torch.long, device=dev)
        self.blueprint = torch.full((n, s), -1, dtype=torch.long, device=dev)  # -1: empty
        self.episode_return = torch.zeros(n, device=dev)
        self.invalid_actions = torch.zeros(n, dtype=torch.long, device=dev)
        self.illegal_combinations = torch.zeros(n, dtype=torch.long, device=dev)
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
        stage = F.one_hot(self.stage, len(Stage)).float()  # [N, S, 6]
        per_slot = torch.cat(
            (
                stage,
                (self.timer.float() / 3).unsqueeze(2),
                self.alpha.unsqueeze(2),
                self._contribution().unsqueeze(2),
            ),
            dim=2,
        )  # [N, S, 9]
        return torch.cat((cue, time, is_open, per_slot.flatten(1)), dim=1)  # [N, F]

    def masks(self) -> ActionMasks:
        """The valid actions of the current step (see the module docstring)."""
        return self._masks

    def blueprint_indices(self) -> torch.Tensor:
        """`[N, S]` int64: the blueprint of the seed in each slot, -1 for an empty slot.

        What the host system passes its policy as `blueprint_indices` at every step; a
        seed keeps its blueprint from germination until its slot empties (a prune
        finished, or the episode's end discards it). Not in `features`: a bundle sees
        it only as an extra input (`LSTMPolicyBundle(blueprint_embed_dim=...)`).
        """
        return self.blueprint.clone()

    def extra_inputs(self, specs: Sequence[ExtraInput]) -> dict[str, torch.Tensor]:
        """The current step's value of each extra input a bundle declares, by name.

        Args:
            specs: The bundle's `extra_inputs`.

        Returns:
            Name to `[N, ...]` tensor, to pass as `**extras` to the bundle's methods;
            empty for a bundle that declares none.

        Raises:
            ValueError: The bundle needs an input the task does not provide.
        """
        provided = {"blueprint_indices": self.blueprint_indices}
        extras: dict[str, torch.Tensor] = {}
        for spec in specs:
            if spec.name not in provided:
                raise ValueError(
                    f"SeedLifecycleTask provides the extra inputs {', '.join(provided)}; "
                    f"the bundle also needs {spec.name!r}"
                )
            extras[spec.name] = provided[spec.name]()
        return extras

    def legal_slots(self) -> torch.Tensor:
        """`[N, |Op|, S]` bool: op `n` is legal on slot `s` now (`WAIT` on none: no slot)."""
        is_open = (self.t >= self.open_step).unsqueeze(1)  # [N, 1]
        stage = self.stage
        live = (stage == Stage.TRAINING) | (stage == Stage.BLENDING) | (stage == Stage.HOLDING)
        return torch.stack(
            (
                torch.zeros_like(live),  # WAIT
                (stage == Stage.EMPTY) & is_open,  # GERMINATE
                (stage == Stage.BLENDING) | (stage == Stage.HOLDING),  # SET_ALPHA_TARGET
                live,  # PRUNE
                stage == Stage.HOLDING,  # FOSSILIZE
                (stage == Stage.TRAINING) & (self.timer == 0),  # ADVANCE
            ),
            dim=1,
        )  # [N, |Op|, S]

    def step(self, action: Mapping[str, torch.Tensor]) -> StepResult:
        """Apply one action per environment, let a step of time pass, and observe.

        An action outside the masks this step offered, or that the task's rules
        refuse although the masks offered it, is counted as invalid and taken as
        `WAIT`; a policy that respects the masks never takes one. Under a flat space,
        an action within the union masks whose op is not legal on its slot is taken
        as `WAIT` and counted as an illegal combination. Heads the chosen op does not
        use are ignored (under a hierarchical space only their range is checked).

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
        within = self._within_masks(action)  # [N]
        asked = F.one_hot(action["slot"].long().clamp(0, num_slots - 1), num_slots).bool()
        legal = self._legal(action["op"].long(), asked)  # [N]
        valid = within & legal
        if self.config.hierarchical:  # the masks are exact: an illegal pair is a masks bug
            self.invalid_actions += (~valid).long()
        else:  # the union masks allow pairs that do not go together
            self.invalid_actions += (~within).long()
            self.illegal_combinations += (within & ~legal).long()
        # A refused row waits: action 0 of every head (WAIT, slot 0, ...), always in range.
        safe = {head: action[head].long().masked_fill(~valid, 0) for head in HEAD_NAMES}  # [N]
        slot = F.one_hot(safe["slot"], num_slots).bool()  # [N, S]
        op = safe["op"]  # [N]

        acted = {which: slot & (op == which).unsqueeze(1) for which in Op}  # [N, S] each
        self._germinate(acted[Op.GERMINATE], safe)
        self._retarget(acted[Op.SET_ALPHA_TARGET], safe)
        self._prune(acted[Op.PRUNE], safe)
        self._set_stage(acted[Op.FOSSILIZE], Stage.FOSSILIZED)
        self._advance(acted[Op.ADVANCE])
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
            illegal_combinations=self.illegal_combinations.clone(),
        )
        self._start_episodes(done)
        self._masks = self._compute_masks()
        return StepResult(self.features(), self._masks, reward, done, episodes)

    # ------------------------------------------------------------------ internals

    def _compute_masks(self) -> ActionMasks:
        space, n = self.config.action_space, self.num_envs
        legal = self.legal_slots()  # [N, |Op|, S]
        op = legal.any(dim=2)
        op[:, Op.WAIT] = True  # [N, |Op|]
        candidates = self._candidates.expand(n, -1)  # [N, A_blueprint]
        if self.config.hierarchical:
            return ActionMasks(op=op, blueprint=candidates, slot_by_op=legal)
        # A flat space: the union over the offered ops; a head no offered op uses
        # keeps one action, so it adds nothing to the log-probability.
        offered = {
            head: op[:, list(_OPS_USING[head])].any(dim=1, keepdim=True)
            for head in HEAD_NAMES
            if head != "op"
        }  # [N, 1] each
        full = {
            head: torch.ones(n, space.size_of(head), dtype=torch.bool, device=self.device)
            for head in offered
        }
        full["slot"] = legal.any(dim=1)  # [N, S]
        full["blueprint"] = candidates
        return ActionMasks(
            op=op, **{head: _choice_or_default(full[head], offered[head]) for head in offered}
        )

    def _within_masks(self, action: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """`[N]` bool: every head's action is in range and allowed by this step's masks.

        Under a hierarchical space a head's mask counts only when the chosen op uses
        it, and is its flat mask AND its row for the chosen op.
        """
        space, masks = self.config.action_space, self._masks
        row = action["op"].long().clamp(0, len(Op) - 1)  # [N]
        used = self._used[row]  # [N, H]
        valid = torch.ones_like(row, dtype=torch.bool)
        for index, head in enumerate(HEAD_NAMES):
            taken = action[head].long()  # [N]
            size = space.size_of(head)
            valid &= (taken >= 0) & (taken < size)
            choice = taken.clamp(0, size - 1).unsqueeze(1)  # [N, 1]
            allowed = torch.ones_like(valid)
            flat = getattr(masks, head)  # [N, A] or None
            if flat is not None:
                allowed &= flat.gather(1, choice).squeeze(1)
            by_op = None if head == "op" else getattr(masks, f"{head}_by_op")
            if by_op is not None:  # [N, |Op|, A]
                at_op = by_op.gather(1, row.view(-1, 1, 1).expand(-1, 1, size)).squeeze(1)
                allowed &= at_op.gather(1, choice).squeeze(1)
            valid &= allowed | ~used[:, index] if self.config.hierarchical else allowed
        return valid

    def _legal(self, op: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """`[N]` bool: the task's rules allow `op` `[N]` on the one-hot `slot` `[N, S]`.

        Checked apart from the masks, from the stage of the one slot asked: a masks
        bug shows up as invalid actions instead of silently bending the rules.
        """
        stage = (self.stage * slot).sum(dim=1)  # [N]
        timer = (self.timer * slot).sum(dim=1)  # [N]
        is_open = self.t >= self.open_step
        blended = (stage == Stage.BLENDING) | (stage == Stage.HOLDING)
        legal = torch.stack(
            (
                torch.ones_like(is_open),  # WAIT
                (stage == Stage.EMPTY) & is_open,  # GERMINATE
                blended,  # SET_ALPHA_TARGET
                blended | (stage == Stage.TRAINING),  # PRUNE
                stage == Stage.HOLDING,  # FOSSILIZE
                (stage == Stage.TRAINING) & (timer == 0),  # ADVANCE
            ),
            dim=1,
        )  # [N, |Op|]
        in_range = (op >= 0) & (op < len(Op))
        return in_range & legal.gather(1, op.clamp(0, len(Op) - 1).unsqueeze(1)).squeeze(1)

    def _contribution(self) -> torch.Tensor:
        """`[N, S]` what each slot's seed adds to the host's accuracy now."""
        quality = self.fit * self.style * self.tempo * self.schedule
        return self._slot_weights * quality * self.alpha

    def _accuracy(self) -> torch.Tensor:
        return self._contribution().sum(dim=1) - self.shock  # [N]

    def _schedule_factor(self, action: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """`[N, 1]` how gentle the action's (alpha speed, alpha curve) schedule is."""
        factor = (
            self._speed_factors[action["alpha_speed"]] * self._curve_factors[action["alpha_curve"]]
        )
        return factor.unsqueeze(1)

    def _germinate(self, where: torch.Tensor, action: Mapping[str, torch.Tensor]) -> None:
        """Start a seed training in the `[N, S]` slots `where`."""
        fits = action["blueprint"] == self.right_blueprint()  # [N]
        fit = torch.where(fits, 1.0, self.config.wrong_blueprint_quality).unsqueeze(1)
        self.blueprint = torch.where(where, action["blueprint"].unsqueeze(1), self.blueprint)
        first = where.any(dim=1) & (self.first_blueprint == 0)  # [N]
        self.first_blueprint = torch.where(first, action["blueprint"], self.first_blueprint)
        self._set_stage(where, Stage.TRAINING)
        self.timer = torch.where(where, self._tempo_steps[action["tempo"]].unsqueeze(1), self.timer)
        self.fit = torch.where(where, fit, self.fit)
        self.style = torch.where(
            where, self._style_factors[action["style"]].unsqueeze(1), self.style
        )
        self.tempo = torch.where(
            where, self._tempo_factors[action["tempo"]].unsqueeze(1), self.tempo
        )
        self.schedule = torch.where(where, 1.0, self.schedule)
        target = self._alpha_targets[action["alpha_target"]].unsqueeze(1)  # [N, 1]
        self.target = torch.where(where, target, self.target)

    def _advance(self, where: torch.Tensor) -> None:
        """Blend the trained seeds `where` to their stored target, on the default schedule."""
        speed, curve = DEFAULT_SCHEDULE
        default = float(self._speed_factors[speed] * self._curve_factors[curve])
        self.schedule = torch.where(where, default, self.schedule)
        self._start_blend(where, self.target, self._blend_steps[speed], torch.tensor(curve))
        self._set_stage(where, Stage.BLENDING)

    def _retarget(self, where: torch.Tensor, action: Mapping[str, torch.Tensor]) -> None:
        """Restyle the seeds `where` and blend them again, to the action's target."""
        style = self._style_factors[action["style"]].unsqueeze(1)  # [N, 1]
        self.style = torch.where(where, style, self.style)
        self.schedule = torch.where(where, self._schedule_factor(action), self.schedule)
        target = self._alpha_targets[action["alpha_target"]].unsqueeze(1)  # [N, 1]
        self.target = torch.where(where, target, self.target)
        length = self._blend_steps[action["alpha_speed"]].unsqueeze(1)  # [N, 1]
        self._start_blend(where, target, length, action["alpha_curve"].unsqueeze(1))
        self._set_stage(where, Stage.BLENDING)

    def _prune(self, where: torch.Tensor, action: Mapping[str, torch.Tensor]) -> None:
        """Ramp the seeds `where` down to alpha 0; the host takes the schedule's shock."""
        harshness = 1 - self._schedule_factor(action)  # [N, 1]
        self.shock += (harshness * self._contribution() * where).sum(dim=1)
        length = self._blend_steps[action["alpha_speed"]].unsqueeze(1)  # [N, 1]
        self._start_blend(
            where, torch.zeros_like(self.alpha), length, action["alpha_curve"].unsqueeze(1)
        )
        self._set_stage(where, Stage.PRUNING)

    def _start_blend(
        self, where: torch.Tensor, target: torch.Tensor, length: torch.Tensor, curve: torch.Tensor
    ) -> None:
        """Move alpha of the slots `where` from its value now to `target` over `length` steps."""
        self.blend_from = torch.where(where, self.alpha, self.blend_from)
        self.blend_to = torch.where(where, target, self.blend_to)
        self.blend_step = self.blend_step.masked_fill(where, 0)
        self.blend_length = torch.where(where, length, self.blend_length)
        self.blend_curve = torch.where(where, curve, self.blend_curve)

    def _pass_time(self) -> None:
        """Training counts down; blends and prunes move alpha along their curve."""
        training = self.stage == Stage.TRAINING
        self.timer = torch.where(training, (self.timer - 1).clamp(min=0), self.timer)
        moving = (self.stage == Stage.BLENDING) | (self.stage == Stage.PRUNING)
        self.blend_step = torch.where(moving, self.blend_step + 1, self.blend_step)
        progress = (self.blend_step.float() / self.blend_length).clamp(max=1.0)  # [N, S]
        shaped = torch.stack((progress, progress**2, 1 - (1 - progress) ** 2), dim=2)
        eased = shaped.gather(2, self.blend_curve.unsqueeze(2)).squeeze(2)  # [N, S]
        alpha = self.blend_from + (self.blend_to - self.blend_from) * eased
        self.alpha = torch.where(moving, alpha, self.alpha)
        finished = moving & (self.blend_step >= self.blend_length)
        self._clear(finished & (self.stage == Stage.PRUNING))
        self._set_stage(finished & (self.stage == Stage.BLENDING), Stage.HOLDING)

    def _set_stage(self, where: torch.Tensor, stage: Stage) -> None:
        self.stage = torch.where(where, int(stage), self.stage)

    def _clear(self, where: torch.Tensor) -> None:
        """Empty the `[N, S]` slots `where`."""
        self._set_stage(where, Stage.EMPTY)
        for name in (
            "timer", "fit", "style", "tempo", "schedule", "target", "alpha", "blend_from",
            "blend_to", "blend_step", "blend_curve",
        ):  # fmt: skip
            value = getattr(self, name)
            setattr(self, name, value.masked_fill(where, 0))
        self.blend_length = self.blend_length.masked_fill(where, 1)
        self.blueprint = self.blueprint.masked_fill(where, -1)

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
        self.shock = self.shock.masked_fill(where, 0.0)
        self.first_blueprint = self.first_blueprint.masked_fill(where, 0)
        self.episode_return = self.episode_return.masked_fill(where, 0.0)
        self.invalid_actions = self.invalid_actions.masked_fill(where, 0)
        self.illegal_combinations = self.illegal_combinations.masked_fill(where, 0)


def _choice_or_default(choices: torch.Tensor, has_choice: torch.Tensor) -> torch.Tensor:
    """`choices` `[N, A]` where `has_choice` `[N, 1]`, else only action 0."""
    default = torch.zeros_like(choices)
    default[:, 0] = True
    return torch.where(has_choice, choices, default)
