"""The results of the pipeline: a table (JSON and Markdown) and two plots (PNG).

Files in the pipeline's workdir: results.json, results.md, curves.png and accuracy.png
(drawn by dvp_jax/plots.py: training curves per stage kind, mean ± std over seeds; Table 1
bars with the paired per-seed differences).
"""
from __future__ import annotations

import os

import numpy as np

from dvp_jax import fileio, plots


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
            row[split] = {"mean": float(np.mean(values)), "std": float(np.std(values)),
                          "per_seed": values}
        best = [r.get("best_val_epoch") for r in recs]
        if all(best):  # The reference's "best val epoch" protocol, beside the final epoch.
            values = [float(b["top1"]) for b in best]
            row["best_val_epoch"] = {"mean": float(np.mean(values)), "std": float(np.std(values)),
                                     "per_seed": values, "split": best[0]["split"],
                                     "epochs": [b.get("epoch") for b in best]}
        out.append(row)
    return out


def markdown_table(results: list[dict], splits) -> str:
    """| method | pretrain epochs | train epochs | val top-1 | test top-1 | (mean ± std)."""
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
    lines.append(f"Mean ± std over seeds {seeds}. The Phase 1 row is the weighted k-NN "
                 "(k = 200) of the frozen encoder, not a trained classifier.")
    lines.append("Split columns: the final epoch. Last column: the best of the periodic "
                 "evaluations on the eval split, as the reference code reports it (optimistic: "
                 "the epoch is chosen on the split it is measured on).")
    return "\n".join(lines)


def _epochs(e) -> str:
    return "-" if not e else (f"{e:g}")


def write_all(results: list[dict], records: list[dict], workdir: str) -> None:
    """results.json, results.md, curves.png, accuracy.png in ``workdir``."""
    splits = [k for k in results[0] if isinstance(results[0][k], dict)
              and k != "best_val_epoch"] if results else []
    fileio.write_json(os.path.join(workdir, "results.json"), {"rows": results, "runs": records},
                      sort_keys=False)
    fileio.write_text(os.path.join(workdir, "results.md"), markdown_table(results, splits) + "\n")
    labels = {r["stage"]: r["method"] for r in results if "stage" in r and "method" in r}
    plots.plot_curves(records, os.path.join(workdir, "curves.png"), labels)
    plots.plot_accuracy(records, splits, os.path.join(workdir, "accuracy.png"), labels)
