"""The ablation's Table-4-shaped report: markdown + JSON + PNG from the finished rows.

One row per variant and one for the blind baseline: the average and per-benchmark headline
scores (eval.report's scales, 0-100), codebook usage and perplexity over the variant's whole
code cache, the VAE-latent loss at the end of stage 2, and stage 2's time per step relative to
the reference (first) variant.
"""
from __future__ import annotations

import json
from pathlib import Path

from eval.ablation.config import BLIND, AblationConfig
from eval.report import DISPLAY_NAMES, headline
from viq.io import atomic_write, atomic_write_json


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_rows(rows: list[dict], benchmarks: list[str]) -> list[dict]:
    """Rows with their headlines, average and time relative to the first (reference) row."""
    reference = next((r.get("stage2_step_s") for r in rows if r["name"] != BLIND), None)
    out = []
    for r in rows:
        scores = {k: headline(k, r["scores"][k]) for k in benchmarks if k in r["scores"]}
        present = [v for v in scores.values() if v is not None]
        step_s = r.get("stage2_step_s")
        out.append({
            **r, "headlines": scores, "avg": sum(present) / len(present) if present else None,
            "relative_time": step_s / reference if step_s and reference else None,
        })
    return out


def markdown(cfg: AblationConfig, rows: list[dict], benchmarks: list[str]) -> str:
    names = [DISPLAY_NAMES.get(k, k) for k in benchmarks]
    lines = [
        f"# Ablation `{cfg.name}`",
        "",
        "| Variant | Avg. | " + " | ".join(names) + " | Codebook usage | Perplexity | VAE-latent loss | Stage-2 s/step | Time vs ref. | MLLM loss |",
        "|---|---:|" + "---:|" * len(names) + "---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [r["label"], _fmt(r["avg"], ".1f"), *(_fmt(r["headlines"].get(k), ".1f") for k in benchmarks),
                 _fmt(r.get("codebook_usage"), ".3f"), _fmt(r.get("codebook_perplexity"), ".1f"),
                 _fmt(r.get("vae_latent_loss"), ".4f"), _fmt(r.get("stage2_step_s"), ".2f"),
                 _fmt(r.get("relative_time"), ".2f"), _fmt(r.get("mllm_final_loss"), ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Scores are eval.report's headlines (0-100) on the listed benchmarks; `Avg.` their mean. Codebook usage and",
        "perplexity count every code of the variant's code cache; the VAE-latent loss is the mean of stage 2's last",
        "logged values (`-`: that variant trains without it); time is stage 2's mean step time, relative to the",
        "first row; MLLM loss is the training loss of the MLLM's last logged step. The blind row trains and",
        "evaluates the MLLM with one fixed code at every image position.",
        "",
        f"Settings: stage 2 `{cfg.stage2.config}` x {cfg.stage2.steps or 'preset'} steps, MLLM `{cfg.mllm.config}` x "
        f"{cfg.mllm.steps or 'preset'} steps, {cfg.ranks} rank(s), eval limit {cfg.eval.limit or 'none'}, "
        f"data `{cfg.data_root}` (n={cfg.synthetic_n}).",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [r for r in rows if r["name"] != BLIND]
    blind = next((r for r in rows if r["name"] == BLIND), None)
    fig, (ax_score, ax_use) = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = [r["name"] for r in variants]  # the short names: the long labels are in table.md
    ax_score.bar(labels, [r["avg"] or 0 for r in variants], color="tab:blue")
    if blind is not None and blind["avg"] is not None:
        ax_score.axhline(blind["avg"], color="tab:red", linestyle="--", label=f"blind baseline {blind['avg']:.1f}")
        ax_score.legend(loc="lower right")
    ax_score.set_ylim(0, max([1.0] + [(r["avg"] or 0) * 1.15 for r in rows]))
    ax_score.set_ylabel("average score (0-100)")
    ax_score.set_title("MLLM score per tokenizer variant")
    ax_use.bar(labels, [r.get("codebook_usage") or 0 for r in variants], color="tab:green")
    ax_use.set_ylabel("codebook usage (fraction)")
    ax_use.set_title("codes used over the data set")
    for ax in (ax_score, ax_use):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_table(cfg: AblationConfig, rows: list[dict], out_dir: Path) -> dict[str, Path]:
    """table.md, table.json and table.png under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    benchmarks = list(cfg.eval.benchmarks)
    full = table_rows(rows, benchmarks)
    paths = {"md": out_dir / "table.md", "json": out_dir / "table.json", "png": out_dir / "table.png"}
    atomic_write(paths["md"], markdown(cfg, full, benchmarks))
    atomic_write_json(paths["json"], {"name": cfg.name, "benchmarks": benchmarks, "rows": json.loads(json.dumps(full))},
                      indent=1)
    plot(full, paths["png"], f"ablation {cfg.name}")
    return paths
