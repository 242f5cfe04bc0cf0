"""Table 1's two figures, drawn from the per-stage records and their metrics.jsonl.

``curves.png`` (``plot_curves``): one panel per kind of quantity, so scales never mix:
  Phase 1 loss | Phase 1 margin-free contrast accuracy (%) | classification cross-entropy | monitor
  accuracy (%) on the eval split (k-NN top-1 for Phase 1, top-1 for the classifiers).
  Each stage is one colour: the mean over seeds as a line, mean ± std over seeds as a band
  (no band for one seed). The legend sits below the panels, outside the data.

``accuracy.png`` (``plot_accuracy``): left, Table 1 as bars (mean over seeds, std as error
bars, every seed as a dot) per split; right, the paired per-seed differences
``Phase 1 + Phase 2 - row`` (the same seed on both sides of each difference): the bar is
their mean, the dots are the seeds, and a bar whose dots all lie right of 0 means Phase 2
won on every seed.

Input records: dicts with 'stage', 'seed', 'accuracy' ({split: top-1 %}) and 'workdir' (the
stage's folder holding metrics.jsonl), as ``dvp_jax.table1.run_stage`` returns them.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from dvp_jax import fileio

# The stages in Table 1's order, each with a fixed colour in both figures.
STAGE_ORDER = ("supervised", "moco", "linear", "finetune", "distill")
COLOURS = {"supervised": "tab:gray", "random": "tab:brown", "moco": "tab:purple",
           "linear": "tab:orange", "finetune": "tab:blue", "distill": "tab:red"}
PHASE1_STAGES = ("moco", "random")  # MoCo-loss stages (no cross-entropy; k-NN monitor).
REFERENCE_STAGE = "distill"  # The paper's method: the left side of every paired difference.
MONITOR_KEYS = ("val_top1", "knn_top1", "top1")


def read_jsonl(path: str) -> list[dict]:
    """Rows of a metrics.jsonl; unreadable lines (a run killed mid-write) are skipped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def _series(rows: list[dict], kind: str, key: str) -> dict[float, float]:
    """{epoch: value} of ``key`` in rows of ``kind`` (a resumed run's repeated steps: last wins)."""
    out = {}
    train = [r for r in rows if r.get("kind") == "train" and r.get("epoch")]
    steps_per_epoch = train[-1]["step"] / train[-1]["epoch"] if train else None
    for r in rows:
        if r.get("kind") != kind or key not in r:
            continue
        epoch = r.get("epoch")
        if epoch is None and steps_per_epoch:
            epoch = r["step"] / steps_per_epoch
        if epoch is not None:
            out[round(float(epoch), 6)] = float(r[key])
    return out


def seed_band(series: Sequence[dict[float, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, std) over seeds at the epochs every seed logged (std 0 for one seed)."""
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    values = np.array([[s[x] for x in common] for s in series], dtype=np.float64)
    if not common:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    return np.array(common), values.mean(axis=0), values.std(axis=0)


def _stages_in(records: list[dict]) -> list[str]:
    present = {r["stage"] for r in records}
    return [s for s in STAGE_ORDER if s in present] + sorted(present - set(STAGE_ORDER))


def _label(stage: str, labels: dict | None) -> str:
    return (labels or {}).get(stage, stage)


def plot_curves(records: list[dict], path: str, labels: dict | None = None) -> None:
    """curves.png: the four panels described in the module docstring."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {id(r): read_jsonl(os.path.join(r["workdir"], "metrics.jsonl")) for r in records}
    panels = [
        ("Phase 1: MoCo loss (with the margin)", "loss", lambda st: st == "moco", "train",
         ("loss",)),
        # Margin-free when logged: with the margin the positive rarely wins, so the plain
        # accuracy reads ~0 while the encoder learns.
        ("Phase 1: contrast accuracy (margin-free)", "top-1 of the positive key (%)",
         lambda st: st == "moco", "train", ("contrast_acc_nomargin", "contrast_acc")),
        ("Classification: cross-entropy (train batches)", "cross-entropy",
         lambda st: st not in PHASE1_STAGES, "train", ("ce", "loss")),
        ("Monitor accuracy on the eval split", "top-1 (%) (Phase 1: k-NN)",
         lambda st: True, "eval", MONITOR_KEYS),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    handles = {}
    for ax, (title, ylabel, wants, kind, keys) in zip(axes.flat, panels):
        for stage in _stages_in(records):
            if not wants(stage):
                continue
            recs = [r for r in records if r["stage"] == stage]
            key = next((k for k in keys if any(_series(rows[id(r)], kind, k) for r in recs)),
                       None)
            if key is None:
                continue
            series = [s for s in (_series(rows[id(r)], kind, key) for r in recs) if s]
            x, mean, std = seed_band(series)
            if not len(x):
                continue
            colour = COLOURS.get(stage)
            marker = "o" if kind == "eval" or len(x) < 12 else None
            (line,) = ax.plot(x, mean, color=colour, marker=marker, markersize=3)
            if len(series) > 1:
                ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2,
                                linewidth=0)
            handles.setdefault(stage, line)
        ax.set_title(title, fontsize=10)
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    seeds = sorted({r["seed"] for r in records})
    fig.suptitle(f"Training curves: mean over seeds {seeds}" +
                 (", band = ± std" if len(seeds) > 1 else ""), fontsize=11)
    if handles:
        handles = {s: handles[s] for s in _stages_in(records) if s in handles}
        fig.legend(list(handles.values()), [_label(s, labels) for s in handles],
                   loc="lower center", ncol=min(3, len(handles)), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    fileio.save_figure(fig, path, dpi=100)
    plt.close(fig)


def paired_differences(records: list[dict], split: str,
                       reference: str = REFERENCE_STAGE) -> dict[str, dict[int, float]]:
    """{stage: {seed: acc(reference, seed) - acc(stage, seed)}} over seeds both stages ran."""
    ref = {r["seed"]: float(r["accuracy"][split]) for r in records
           if r["stage"] == reference and split in r["accuracy"]}
    out = {}
    for stage in _stages_in(records):
        if stage == reference:
            continue
        diffs = {r["seed"]: ref[r["seed"]] - float(r["accuracy"][split]) for r in records
                 if r["stage"] == stage and r["seed"] in ref and split in r["accuracy"]}
        if diffs:
            out[stage] = dict(sorted(diffs.items()))
    return out


def _spread(n: int, width: float) -> np.ndarray:
    """Offsets that set ``n`` per-seed dots side by side inside a bar of ``width``."""
    return np.linspace(-width / 4, width / 4, n) if n > 1 else np.zeros(n)


def plot_accuracy(records: list[dict], splits: Sequence[str], path: str,
                  labels: dict | None = None) -> None:
    """accuracy.png: Table 1 bars (left) and paired per-seed differences (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = _stages_in(records)
    has_reference = REFERENCE_STAGE in stages
    fig, axes = plt.subplots(1, 2 if has_reference else 1, figsize=(14, 5.5), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2] if has_reference else [1]})
    ax = axes[0, 0]
    split_colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    width = 0.8 / max(1, len(splits))
    for i, split in enumerate(splits):
        for j, stage in enumerate(stages):
            values = [float(r["accuracy"][split]) for r in records
                      if r["stage"] == stage and split in r["accuracy"]]
            if not values:
                continue
            x = j + (i - (len(splits) - 1) / 2) * width
            mean, std = float(np.mean(values)), float(np.std(values))
            ax.bar(x, mean, width * 0.95, yerr=std if len(values) > 1 else None, capsize=3,
                   ecolor="dimgray", color=split_colours[i % len(split_colours)], alpha=0.85,
                   label=split if j == 0 else None)
            ax.scatter(x + _spread(len(values), width), values, s=10, color="black", zorder=3)
            ax.text(x, 1.5, f"{mean:.1f}", rotation=90, ha="center", va="bottom", fontsize=8,
                    color="white", fontweight="bold")  # Inside the bar: never on the dots.
    ax.set_xticks(range(len(stages)))
    ax.set_xticklabels([_label(s, labels) for s in stages], rotation=20, ha="right",
                       fontsize=8)
    seeds = sorted({r["seed"] for r in records})
    ax.set(ylabel="top-1 (%)", title=f"Table 1 on this data (mean, ± std, dots: seeds {seeds})")
    ax.set_ylim(0, max(100.0, ax.get_ylim()[1]))
    ax.legend(title="split", loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.grid(axis="y", alpha=0.3)

    if has_reference:
        ax = axes[0, 1]
        others = [s for s in stages if s != REFERENCE_STAGE]
        height = 0.8 / max(1, len(splits))
        for i, split in enumerate(splits):
            diffs = paired_differences(records, split)
            for j, stage in enumerate(others):
                if stage not in diffs:
                    continue
                values = list(diffs[stage].values())
                y = j + (i - (len(splits) - 1) / 2) * height
                ax.barh(y, np.mean(values), height * 0.95,
                        color=split_colours[i % len(split_colours)], alpha=0.85,
                        label=split if j == 0 else None)
                ax.scatter(values, y + _spread(len(values), height), s=10, color="black",
                           zorder=3)
        ax.axvline(0, color="black", linewidth=0.8)
        lo, hi = ax.get_xlim()
        pad = max(1.0, 0.08 * (hi - lo))  # 0 never on the frame: dots at 0 stay visible.
        ax.set_xlim(min(lo, -pad), max(hi, pad))
        ax.set_yticks(range(len(others)))
        ax.set_yticklabels([_label(s, labels) for s in others], fontsize=8)
        ax.invert_yaxis()
        ax.set(xlabel="top-1 difference (percentage points)",
               title=f"{_label(REFERENCE_STAGE, labels)} minus each row,\n"
                     "paired by seed (bar: mean, dots: seeds)")
        ax.title.set_fontsize(10)
        ax.legend(title="split", loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fileio.save_figure(fig, path, dpi=100)
    plt.close(fig)
