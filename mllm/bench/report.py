"""Tables and the figure of the throughput benchmark (JSON from mllm.bench in, markdown / PNG out)."""
from __future__ import annotations

from pathlib import Path


def _point_label(point: dict) -> str:
    llm = point["llm"].replace("qwen2.5-", "").upper()
    return f"{llm} {point['capacity'] // 1024}k" if point["capacity"] >= 1024 else f"{llm} {point['capacity']}"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def comparison_table(points: list[dict]) -> str:
    """One row per (LLM, context, arm): the timings and how much slower the arm is than cached codes
    (per micro-batch and optimizer step, and per sample: an arm with more image positions per
    image, LLaVA-OV's, fits fewer samples in a pack)."""
    lines = [
        "| LLM, context | arm | forward ms (micro-batch) | step ms (optimizer step) | tokens/s | samples/s | peak GiB | MFU "
        "| codes speed-up (forward / step) | codes speed-up per sample |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for point in points:
        for arm, e in point["arms"].items():
            speedup = "-" if arm == "codes" else f"{e['codes_forward_speedup']:.2f}x / {e['codes_step_speedup']:.2f}x" \
                if "codes_step_speedup" in e else "-"
            per_sample = f"{e['codes_sample_speedup']:.2f}x" if "codes_sample_speedup" in e else "-"
            lines.append(
                f"| {_point_label(point)} | {arm} | {e['forward_ms']:.1f} | {e['step_ms']:.1f} | {e['tokens_per_s']:,.0f} | "
                f"{e['samples_per_s']:.1f} | {_fmt(e.get('peak_memory_gib'), '.1f')} | {_fmt(e.get('mfu'), '.1%')} | {speedup} "
                f"| {per_sample} |"
            )
        for arm, error in point.get("errors", {}).items():
            lines.append(f"| {_point_label(point)} | {arm} | failed: {error} | | | | | | | |")
    return "\n".join(lines) + "\n"


def lever_table(sweep: list[dict]) -> str:
    """Cached-code step under each cumulative setting of a lever sweep."""
    lines = ["| LLM, context | setting | step ms | tokens/s | MFU | peak GiB |", "|---|---|---:|---:|---:|---:|"]
    for point in sweep:
        e = point["arms"].get("codes")
        label = point.get("lever", "")
        if e is None:
            lines.append(f"| {_point_label(point)} | {label} | failed: {point['errors'].get('codes', '')} | | | |")
            continue
        lines.append(f"| {_point_label(point)} | {label} | {e['step_ms']:.1f} | {e['tokens_per_s']:,.0f} | "
                     f"{_fmt(e.get('mfu'), '.1%')} | {_fmt(e.get('peak_memory_gib'), '.1f')} |")
    return "\n".join(lines) + "\n"


def plot_comparison(points: list[dict], path: str | Path) -> Path:
    """Grouped bars of forward and full-step time per (LLM, context), one bar per arm, each
    labelled with how much longer it takes than cached codes (the layout of the ViQ paper's Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = []
    for point in points:
        arms += [a for a in point["arms"] if a not in arms]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(points) * 2), 4.2))
    width = 0.8 / max(len(arms), 1)
    for ax, key, title in ((axes[0], "forward_ms", "forward pass"), (axes[1], "step_ms", "full training step")):
        for j, arm in enumerate(arms):
            xs, ys = [], []
            for i, point in enumerate(points):
                if arm in point["arms"]:
                    xs.append(i + (j - (len(arms) - 1) / 2) * width)
                    ys.append(point["arms"][arm][key])
            bars = ax.bar(xs, ys, width, label=arm)
            for x, y, point in zip(xs, ys, [p for p in points if arm in p["arms"]]):
                codes = point["arms"].get("codes")
                if codes and arm != "codes":
                    ax.annotate(f"{y / codes[key] - 1:+.0%}", (x, y), ha="center", va="bottom", fontsize=6, rotation=90)
            del bars
        ax.set_xticks(range(len(points)), [_point_label(p) for p in points])
        ax.set_ylabel("ms per micro-batch" if key == "forward_ms" else "ms per optimizer step")
        ax.set_title(title)
    axes[1].legend(fontsize=7)
    device = points[0].get("device", "") if points else ""
    fig.suptitle(f"Cached ViQ codes vs encoders in the loop ({device})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_and_save(result: dict, out: str | None) -> None:
    """A benchmark's JSON on stdout, and in `out` (atomically) when given."""
    import json

    from viq.io import atomic_write

    text = json.dumps(result, indent=2)
    print(text)
    if out:
        atomic_write(out, text + "\n")
