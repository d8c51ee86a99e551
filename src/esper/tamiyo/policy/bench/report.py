"""What `esper-policy bench` reports: rows old against new, shares of a step, targets.

Plain records and their rendering as a text table and as JSON; nothing here measures.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from esper.tamiyo.policy.bench.harness import Timing

__all__ = ["Comparison", "Report", "Share", "Target", "format_report", "write_json"]

Unit = Literal["us", "bytes"]
"""What a comparison's figures are: microseconds per call, or bytes."""

_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Comparison:
    """One measurement of the old design against the new one.

    Attributes:
        key: Stable identifier, e.g. `get_action/B=32`; targets look rows up by it.
        section: Key of the section the row is printed under.
        name: What was measured, in words.
        unit: `us` (median microseconds per call) or `bytes` (peak memory).
        old: The old design's figure; `None` when the row failed.
        new: The new design's figure; `None` when the row failed.
        error: Why the row failed (e.g. compilation), else `None`.
        old_timing: The old side's timing details, for `us` rows.
        new_timing: The new side's timing details, for `us` rows.
        error_detail: The failure's longer message, for the JSON.
    """

    key: str
    section: str
    name: str
    unit: Unit
    old: float | None
    new: float | None
    error: str | None = None
    old_timing: Timing | None = None
    new_timing: Timing | None = None
    error_detail: str = ""

    @property
    def ratio(self) -> float | None:
        """`new / old`, or `None` when the row failed."""
        if self.old is None or self.new is None:
            return None
        return self.new / self.old

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON object: `old_us`/`new_us` or `old_bytes`/`new_bytes`, `ratio`."""
        row: dict[str, Any] = {"key": self.key, "section": self.section, "name": self.name}
        row["unit"] = self.unit
        row[f"old_{self.unit}"] = self.old
        row[f"new_{self.unit}"] = self.new
        row["ratio"] = self.ratio
        if self.unit == "bytes":
            row["old_mib"] = None if self.old is None else self.old / _MIB
            row["new_mib"] = None if self.new is None else self.new / _MIB
        for side, timing in (("old", self.old_timing), ("new", self.new_timing)):
            if timing is not None:
                row[f"{side}_min_us"] = timing.min_us
                row[f"{side}_max_us"] = timing.max_us
                row[f"{side}_calls_per_repeat"] = timing.calls_per_repeat
        if self.error is not None:
            row["error"] = self.error
            row["error_detail"] = self.error_detail or self.error
        return row


@dataclass(frozen=True, slots=True)
class Share:
    """The time one part of a `get_action` step takes, against the whole step.

    Attributes:
        key: Stable identifier, e.g. `normalize/checks_on`.
        name: The part, in words.
        check_values: The bundle's `check_values` during the measurement.
        part_us: Median microseconds per call of the part alone.
        step_us: Median microseconds per whole step, same bundle and inputs.
    """

    key: str
    name: str
    check_values: bool
    part_us: float
    step_us: float

    @property
    def share(self) -> float:
        """`part_us / step_us`."""
        return self.part_us / self.step_us

    def to_json(self) -> dict[str, Any]:
        """The share as a JSON object."""
        return {
            "key": self.key,
            "name": self.name,
            "check_values": self.check_values,
            "part_us": self.part_us,
            "step_us": self.step_us,
            "share": self.share,
        }


@dataclass(frozen=True, slots=True)
class Target:
    """Where one performance target stands: a report, not an assertion.

    Attributes:
        key: Stable identifier.
        name: What is compared, in words.
        goal: The target, in words (e.g. `new/old <= 0.15`).
        value: The measured figure compared with `limit`; `None` if not measured.
        limit: The largest `value` that meets the target.
        met: `value <= limit`.
        detail: The numbers behind `value`.
        percent: Print `value` as a percentage (a share) rather than a ratio.
    """

    key: str
    name: str
    goal: str
    value: float | None
    limit: float
    met: bool
    detail: str
    percent: bool = False

    def to_json(self) -> dict[str, Any]:
        """The target as a JSON object."""
        return {
            "key": self.key,
            "name": self.name,
            "goal": self.goal,
            "value": self.value,
            "limit": self.limit,
            "met": self.met,
            "detail": self.detail,
        }


@dataclass(slots=True)
class Report:
    """Everything one run measured, and what produced it.

    Attributes:
        machine: Platform, processor, CPU count, Python, torch, threads, device.
        commit: Short git commit of the package's checkout, or `unknown`.
        timestamp: When the run started, ISO 8601 in UTC.
        settings: How it was measured.
        sections: Section key to title, in print order.
        rows: Old-against-new comparisons.
        shares: Parts of a new `get_action` step.
        targets: Where the targets stand.
    """

    machine: dict[str, Any]
    commit: str
    timestamp: str
    settings: dict[str, Any]
    sections: dict[str, str]
    rows: list[Comparison] = field(default_factory=list)
    shares: list[Share] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The report as one JSON object."""
        rows = [row.to_json() for row in self.rows]
        shares = [share.to_json() for share in self.shares]
        targets = [target.to_json() for target in self.targets]
        return {
            "machine": self.machine,
            "commit": self.commit,
            "timestamp": self.timestamp,
            "settings": self.settings,
            "results": rows,
            "shares": shares,
            "targets": targets,
        }


def _figure(value: float | None, unit: Unit) -> str:
    if value is None:
        return "-"
    return f"{value / _MIB:.2f}" if unit == "bytes" else f"{value:.1f}"


def _comparison_lines(title: str, rows: Sequence[Comparison]) -> list[str]:
    unit = "MiB" if rows[0].unit == "bytes" else "µs"
    lines = [title, f"  {'':<52}{'old ' + unit:>11}{'new ' + unit:>11}{'new/old':>9}"]
    for row in rows:
        if row.error is not None:
            lines.append(f"  {row.name:<52}failed: {row.error}")
            continue
        ratio = row.ratio
        shown = "-" if ratio is None else f"{ratio:.3f}"
        old, new = _figure(row.old, row.unit), _figure(row.new, row.unit)
        lines.append(f"  {row.name:<52}{old:>11}{new:>11}{shown:>9}")
    return lines


def _share_lines(title: str, shares: Sequence[Share]) -> list[str]:
    lines = [title, f"  {'':<36}{'checks on':>22}{'checks off':>22}"]
    names: list[str] = []
    by_cell: dict[tuple[str, bool], Share] = {}
    for share in shares:
        if share.name not in names:
            names.append(share.name)
        by_cell[share.name, share.check_values] = share
    for name in names:
        cells = ""
        for checks in (True, False):
            found = by_cell.get((name, checks))
            cell = "-" if found is None else f"{found.part_us:.1f} µs {found.share:6.1%}"
            cells += f"{cell:>22}"
        lines.append(f"  {name:<36}{cells}")
    return lines


def _target_lines(targets: Sequence[Target]) -> list[str]:
    lines = ["Targets (where they stand; a report, not a test)"]
    for target in targets:
        verdict = "met" if target.met else "not met"
        if target.value is None:
            value = "-"
        else:
            value = f"{target.value:.1%}" if target.percent else f"{target.value:.3f}"
        lines.append(f"  {verdict:<8} {target.name}: {target.goal}, measured {value}")
        lines.append(f"  {'':<8}   {target.detail}")
    return lines


def format_report(report: Report) -> str:
    """The report as a readable text table, one section per measurement, then targets."""
    machine, settings = report.machine, report.settings
    lines = [
        f"esper-policy bench ({settings['mode']}): old = {settings['old']}, new = "
        f"{settings['new']}, same weights",
        f"{machine['platform']}, {machine['processor']}, Python {machine['python']}, torch "
        f"{machine['torch']}, {machine['threads']} thread(s), device {machine['device']}, "
        f"commit {report.commit}",
        f"median of {settings['repeats']} interleaved repeats per figure, "
        f"feature_dim {settings['feature_dim']}",
    ]
    for key, title in report.sections.items():
        if key == "share":
            if report.shares:
                lines += ["", *_share_lines(title, report.shares)]
            continue
        rows: list[Comparison] = []
        for row in report.rows:
            if row.section == key:
                rows.append(row)
        if rows:
            lines += ["", *_comparison_lines(title, rows)]
    lines += ["", *_target_lines(report.targets)]
    return "\n".join(lines)


def write_json(report: Report, path: Path) -> None:
    """Write `report.to_json()` to `path`, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
