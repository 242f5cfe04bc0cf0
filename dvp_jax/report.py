"""The results of the pipeline: a table (JSON and Markdown) and two plots (PNG).

Files in the pipeline's workdir: results.json, results.md, curves.png (training loss and
monitor accuracy of every stage, per seed), accuracy.png (val / test top-1 per method,
mean with the std over seeds as error bars).
"""
from __future__ import annotations

import os

import numpy as np

from dvp_jax import fileio


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
        out.append(row)
    return out


def markdown_table(results: list[dict], splits) -> str:
    """| method | pretrain epochs | train epochs | val top-1 | test top-1 | (mean ± std)."""
    head = "| method | pretrain epochs | train epochs | " + " | ".join(
        f"{s} top-1 (%)" for s in splits) + " |"
    sep = "|" + "---|" * (3 + len(splits))
    lines = [head, sep]
    for r in results:
        cells = [f"{r[s]['mean']:.1f} ± {r[s]['std']:.1f}" for s in splits]
        lines.append(f"| {r['method']} | {_epochs(r['pretrain_epochs'])} | "
                     f"{_epochs(r['train_epochs'])} | " + " | ".join(cells) + " |")
    seeds = results[0]["seeds"] if results else []
    lines.append("")
    lines.append(f"Mean ± std over seeds {seeds}. The Phase 1 row is the weighted k-NN "
                 "(k = 200) of the frozen encoder, not a trained classifier.")
    return "\n".join(lines)


def _epochs(e) -> str:
    return "-" if not e else (f"{e:g}")


def _read_jsonl(path: str) -> list[dict]:
    return fileio.read_jsonl(path)


def plot_curves(records: list[dict], path: str) -> None:
    """Training loss (left) and monitor accuracy (right) against epoch, one line per stage/seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for rec in records:
        rows = _read_jsonl(os.path.join(rec["workdir"], "metrics.jsonl"))
        train = [r for r in rows if r.get("kind") == "train"]
        if train:
            ax_loss.plot([r["epoch"] for r in train], [r["loss"] for r in train],
                         label=f"{rec['stage']} s{rec['seed']}")
        evals = [r for r in rows if r.get("kind") == "eval"]
        key = next((k for k in ("val_top1", "knn_top1", "top1") if evals and k in evals[0]), None)
        if key:
            spe = train[-1]["step"] / train[-1]["epoch"] if train and train[-1]["epoch"] else 1
            ax_acc.plot([r["step"] / spe for r in evals], [r[key] for r in evals], marker="o",
                        label=f"{rec['stage']} s{rec['seed']} ({key})")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="Monitor accuracy (eval split)")
    for ax in (ax_loss, ax_acc):
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fileio.save_figure(fig, path, dpi=100)
    plt.close(fig)


def plot_accuracy(results: list[dict], splits, path: str) -> None:
    """Grouped bars: top-1 per method and split, std over seeds as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4.5))
    x = np.arange(len(results))
    width = 0.8 / max(1, len(splits))
    for i, split in enumerate(splits):
        ax.bar(x + i * width, [r[split]["mean"] for r in results], width,
               yerr=[r[split]["std"] for r in results], capsize=3, label=split)
    ax.set_xticks(x + width * (len(splits) - 1) / 2)
    ax.set_xticklabels([r["method"] for r in results], rotation=15, ha="right", fontsize=8)
    ax.set(ylabel="top-1 (%)", title="Table 1 on this data")
    ax.legend()
    fig.tight_layout()
    fileio.save_figure(fig, path, dpi=100)
    plt.close(fig)


def write_all(results: list[dict], records: list[dict], workdir: str) -> None:
    """results.json, results.md, curves.png, accuracy.png in ``workdir``."""
    splits = [k for k in results[0] if isinstance(results[0][k], dict)] if results else []
    fileio.write_json(os.path.join(workdir, "results.json"), {"rows": results, "runs": records},
                      sort_keys=False)
    fileio.write_text(os.path.join(workdir, "results.md"), markdown_table(results, splits) + "\n")
    plot_curves(records, os.path.join(workdir, "curves.png"))
    plot_accuracy(results, splits, os.path.join(workdir, "accuracy.png"))
