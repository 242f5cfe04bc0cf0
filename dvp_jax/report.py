"""The results of Table 1: a table (JSON and Markdown) and two plots (PNG).

Files in the Table-1 workdir: results.json, results.md, curves.png and accuracy.png
(drawn by dvp_jax/plots.py: training curves per stage kind, mean ± std over seeds; Table 1
bars with the paired per-seed differences).

Statistics: std is the sample standard deviation over seeds (ddof = 1). Paired comparisons
take the per-seed difference a - b of two rows (same seed = same data order and Phase 1) and
give its mean with a 95% Student-t confidence interval, mean ± t(0.975, n-1) * sd / sqrt(n);
a difference is called significant when that interval excludes 0.

As a command, rewrites the marked section of a README from a results.json:

    python -m dvp_jax.report runs/dvp/results.json --readme README.md --section default

replaces the text between ``<!-- results:default -->`` and ``<!-- /results:default -->``
with the tables and sentences of ``markdown_table`` (the figures are never typed by hand).
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
from absl import flags

from dvp_jax import cli, errors, fileio, plots

# The paper's Table 1 ordering (ResNet-50 on VIPriors): each row below the next one.
PAPER_ORDER = ("supervised", "linear", "finetune", "distill")


class ReportError(errors.UserError, ValueError):
    """A results.json or README that cannot be read, or a README without the section markers."""


def summarise(records: list[dict], rows: dict, splits) -> list[dict]:
    """One row per stage: label, epochs, per-split mean / std / per-seed top-1 (%)."""
    out = []
    for stage, (label, _) in rows.items():
        recs = [r for r in records if r["stage"] == stage]
        if not recs:
            continue
        row = {"stage": stage, "method": label, "pretrain_epochs": recs[0]["pretrain_epochs"],
               "train_epochs": recs[0]["train_epochs"], "seeds": [r["seed"] for r in recs]}
        for split in splits:
            values = [float(r["accuracy"][split]) for r in recs]
            row[split] = {"mean": float(np.mean(values)), "std": sample_std(values),
                          "per_seed": values}
        best = [r.get("best_val_epoch") for r in recs]
        if all(best):  # The reference's "best val epoch" protocol, beside the final epoch.
            values = [float(b["top1"]) for b in best]
            row["best_val_epoch"] = {"mean": float(np.mean(values)), "std": sample_std(values),
                                     "per_seed": values, "split": best[0]["split"],
                                     "epochs": [b.get("epoch") for b in best]}
        out.append(row)
    return out


def sample_std(values) -> float:
    """Standard deviation with ddof = 1 (0.0 for a single value)."""
    values = np.asarray(values, np.float64)
    return float(np.std(values, ddof=1)) if values.size > 1 else 0.0


def t_interval(differences, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t confidence interval of the mean of ``differences``.

    mean ± t(1 - (1 - confidence) / 2, n - 1) * sd / sqrt(n), sd with ddof = 1; a single
    value gives an unbounded interval (nan, nan).
    """
    from scipy import stats
    d = np.asarray(differences, np.float64)
    mean = float(np.mean(d))
    if d.size < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + confidence / 2, d.size - 1)) * sample_std(d) / math.sqrt(d.size)
    return mean, mean - half, mean + half


def paired_differences(records: list[dict], pairs, splits) -> list[dict]:
    """Per-seed differences a - b for each (label, stage a, stage b) in ``pairs``.

    Only seeds that ran both stages count. Each item: label, a, b, seeds, and per split
    {'per_seed', 'mean', 'ci95': [low, high] or None (one seed), 'significant'} (the interval
    excludes 0).
    """
    by_key = {(r["stage"], r["seed"]): r for r in records}
    out = []
    for label, a, b in pairs:
        seeds = sorted(seed for (stage, seed) in by_key if stage == a and (b, seed) in by_key)
        if not seeds:
            continue
        item = {"label": label, "a": a, "b": b, "seeds": seeds}
        for split in splits:
            d = [float(by_key[(a, s)]["accuracy"][split]) - float(by_key[(b, s)]["accuracy"][split])
                 for s in seeds]
            mean, low, high = t_interval(d)
            bounded = not math.isnan(low)  # One seed: no interval (null in JSON).
            item[split] = {"per_seed": d, "mean": mean,
                           "ci95": [low, high] if bounded else None,
                           "significant": bool(bounded and (low > 0 or high < 0))}
        out.append(item)
    return out


def paired_table(paired: list[dict], splits) -> str:
    """Markdown: | comparison | per split: mean difference [95% CI] |, then one sentence each."""
    lines = ["| paired difference (points) | " + " | ".join(
        f"{s}: mean [95% CI]" for s in splits) + " |", "|" + "---|" * (1 + len(splits))]
    for p in paired:
        cells = [f"{p[s]['mean']:+.1f} " + (
            f"[{p[s]['ci95'][0]:+.1f}, {p[s]['ci95'][1]:+.1f}]" if p[s]["ci95"] else
            "[n/a: 1 seed]") + (" *" if p[s]["significant"] else "") for s in splits]
        lines.append(f"| {p['label']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Per-seed differences over seeds {paired[0]['seeds'] if paired else []}, "
                 "95% Student-t intervals; * = significant (the interval excludes 0).")
    for p in paired:
        words = []
        for s in splits:
            if p[s]["significant"]:
                words.append(f"significant on {s} ({'a gain' if p[s]['mean'] > 0 else 'a loss'}"
                             f" of {abs(p[s]['mean']):.1f} points)")
            elif p[s]["ci95"] is None:
                words.append(f"no interval on {s} (one seed)")
            else:
                words.append(f"not significant on {s}")
        lines.append(f"- {p['label']}: " + "; ".join(words) + ".")
    return "\n".join(lines)


def ordering_notes(results: list[dict], splits, order=PAPER_ORDER) -> list[str]:
    """Sentences naming every place where the paper's ordering of rows (``order``, each row
    below the next) does not hold in the mean, with the numbers."""
    rows = {r["stage"]: r for r in results}
    notes = []
    present = [s for s in order if s in rows]
    for lower, upper in zip(present, present[1:]):
        for split in splits:
            lo, up = rows[lower][split]["mean"], rows[upper][split]["mean"]
            if not lo < up:
                notes.append(f"The paper's ordering {rows[lower]['method']} < "
                             f"{rows[upper]['method']} does not hold on {split}: "
                             f"{lo:.1f} vs {up:.1f}.")
    return notes


def markdown_table(results: list[dict], splits, paired: list[dict] | None = None) -> str:
    """| method | pretrain epochs | train epochs | val top-1 | test top-1 | (mean ± std), then
    the paired differences and the places where the paper's ordering does not hold."""
    head = "| method | pretrain epochs | train epochs | " + " | ".join(
        f"{s} top-1 (%) final" for s in splits) + " | best val epoch (reference protocol) |"
    sep = "|" + "---|" * (4 + len(splits))
    lines = [head, sep]
    for r in results:
        cells = [f"{r[s]['mean']:.1f} ± {r[s]['std']:.1f}" for s in splits]
        best = r.get("best_val_epoch")
        cells.append(f"{best['mean']:.1f} ± {best['std']:.1f}" if best else "-")
        lines.append(f"| {r['method']} | {_epochs(r['pretrain_epochs'])} | "
                     f"{_epochs(r['train_epochs'])} | " + " | ".join(cells) + " |")
    seeds = results[0]["seeds"] if results else []
    lines.append("")
    lines.append(f"Mean ± sample std (ddof = 1) over seeds {seeds}. The k-NN rows are the "
                 "weighted k-NN of the frozen encoder (train images as the bank), not a trained "
                 "classifier.")
    lines.append("Split columns: the final epoch. Last column: the best of the periodic "
                 "evaluations on the eval split, as the reference code reports it (optimistic: "
                 "the epoch is chosen on the split it is measured on).")
    if paired:
        lines += ["", paired_table(paired, splits)]
    notes = ordering_notes(results, splits)
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def _epochs(e) -> str:
    return "-" if not e else (f"{e:g}")


def result_splits(results: list[dict]) -> list[str]:
    """The evaluated splits of summarised rows (their dict-valued keys)."""
    return [k for k in results[0] if isinstance(results[0][k], dict)
            and k != "best_val_epoch"] if results else []


def write_all(results: list[dict], records: list[dict], workdir: str,
              paired: list[dict] | None = None) -> None:
    """results.json, results.md, curves.png, accuracy.png in ``workdir``."""
    splits = result_splits(results)
    fileio.write_json(os.path.join(workdir, "results.json"),
                      {"rows": results, "paired": paired or [], "runs": records,
                       "std": "sample std over seeds (ddof = 1)",
                       "ci": "95% Student-t interval of the mean per-seed difference"},
                      sort_keys=False)
    fileio.write_text(os.path.join(workdir, "results.md"),
                      markdown_table(results, splits, paired) + "\n")
    labels = {r["stage"]: r["method"] for r in results if "stage" in r and "method" in r}
    plots.plot_curves(records, os.path.join(workdir, "curves.png"), labels)
    plots.plot_accuracy(records, splits, os.path.join(workdir, "accuracy.png"), labels)


def readme_section(results_json: str) -> str:
    """The Markdown that ``--readme`` writes: the tables of a results.json."""
    saved = fileio.read_json(results_json)
    rows = saved["rows"]
    return markdown_table(rows, result_splits(rows), saved.get("paired"))


def replace_section(text: str, section: str, body: str) -> str:
    """``text`` with the lines between ``<!-- results:SECTION -->`` and
    ``<!-- /results:SECTION -->`` replaced by ``body``; ReportError (a ValueError) if the markers
    are missing."""
    begin, end = f"<!-- results:{section} -->", f"<!-- /results:{section} -->"
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise ReportError(f"markers {begin} ... {end} not found (in this order)")
    return text[:i + len(begin)] + "\n" + body.strip() + "\n" + text[j:]


PROG = "python -m dvp_jax.report"
FLAGS = flags.FlagValues()
flags.DEFINE_string("readme", "", "Markdown file whose section to rewrite (default: print the "
                    "tables)", flag_values=FLAGS)
flags.DEFINE_string("section", "default",
                    "section name: <!-- results:NAME --> ... <!-- /results:NAME -->",
                    flag_values=FLAGS)


def _rewrite(results: str, readme: str, section: str) -> int:
    """Prints the tables of ``results`` or rewrites ``section`` of ``readme`` with them."""
    try:
        body = readme_section(results)
        if not readme:
            print(body)
            return 0
        with open(readme) as f:
            text = f.read()
        fileio.write_text(readme, replace_section(text, section, body))
    except errors.USER_ERRORS:
        raise
    except (OSError, ValueError, KeyError) as e:  # A missing or malformed file.
        raise ReportError(str(e)) from e
    print(f"wrote section {section!r} of {readme} from {results}")
    return 0


def main(argv=None) -> int:
    """Exit code: 0, or 2 after a one-line error."""
    args = cli.parse(FLAGS, argv, prog=PROG, doc=__doc__, positional="RESULTS_JSON",
                     min_positional=1, max_positional=1)
    return cli.run(lambda: _rewrite(args.positional[0], args.readme, args.section))


if __name__ == "__main__":
    sys.exit(main())
