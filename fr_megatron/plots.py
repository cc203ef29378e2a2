"""Pictures of a run: the loss curve with its faults marked, and each recovery's phases."""

from __future__ import annotations

from typing import Optional

PHASES = ("detect", "abort", "rebuild", "restore", "resume")
COLORS = {"detect": "#d62728", "abort": "#ff7f0e", "rebuild": "#1f77b4", "restore": "#2ca02c",
          "resume": "#9467bd"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curve(path: str, losses: dict[int, float], faults: list[dict],
               baseline: Optional[dict[int, float]] = None, title: str = "") -> str:
    """Loss per step (and the fault-free run's, dashed), a red line at each fault."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = sorted(losses)
    if baseline:
        b = sorted(baseline)
        ax.plot(b, [baseline[s] for s in b], "--", color="0.6", lw=2.5, label="fault-free run")
    ax.plot(steps, [losses[s] for s in steps], "-o", ms=3, color="#1f77b4",
            label="with fault(s), flash recovery")
    for i, f in enumerate(faults):
        ax.axvline(f["step"], color="#d62728", ls=":", lw=1.5)
        rec = f.get("recovery_s")
        ax.annotate(f"{f['kind']} rank {f['rank']}\n{f['phase']}" +
                    (f"\nrecovered in {rec:.2f}s" if rec is not None else ""),
                    xy=(f["step"], ax.get_ylim()[1]), xytext=(4, -4 - 36 * (i % 2)),
                    textcoords="offset points", va="top", fontsize=8, color="#d62728")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "Loss with the fault marked")
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def recovery_timeline(path: str, faults: list[dict], title: str = "") -> str:
    """One horizontal bar per recovery, split into its phases (seconds from the fault)."""
    plt = _plt()
    rows = [f for f in faults if f.get("phases")]
    fig, ax = plt.subplots(figsize=(8, 1.8 + 0.7 * max(1, len(rows))))
    for y, f in enumerate(rows):
        t = 0.0
        for ph in PHASES:
            d = f["phases"].get(ph, 0.0) or 0.0
            ax.barh(y, d, left=t, color=COLORS[ph], edgecolor="white",
                    label=ph if y == 0 else None)
            if d > 0.06 * max(1e-9, sum(f["phases"].values())):
                ax.text(t + d / 2, y, f"{d:.2f}s", ha="center", va="center", fontsize=8,
                        color="white")
            t += d
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{f['kind']} r{f['rank']} @ step {f['step']}\n({f.get('replacement')})"
                        for f in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds from the fault")
    ax.set_title(title or "Recovery timeline by phase")
    ax.legend(ncol=5, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.45 / len(rows)
                                                                      if rows else -0.3))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
