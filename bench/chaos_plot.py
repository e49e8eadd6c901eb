"""The chaos harness's timeline: good responses/s, failed requests and p99 latency per 100 ms,
with every injected event drawn as a labelled vertical line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["draw_timeline"]

_COLOURS = {"sigkill": "tab:red", "sigstop": "tab:purple", "sigcont": "tab:purple",
            "sigterm": "tab:orange", "restart": "tab:green", "rejoined": "tab:green",
            "cut": "tab:cyan", "heal": "tab:cyan", "phase": "tab:gray"}


def draw_timeline(path: Path, *, ts: Sequence[float], ok: Sequence[int], bad: Sequence[int],
                  p99_ms: Sequence[float], events: Sequence[tuple[float, str, str]],
                  title: str, bin_s: float = 0.1,
                  cpu: Sequence[Sequence[float]] = ()) -> None:
    """Write a PNG; `events` are (t, kind, label); `cpu` rows are (t, machine, this run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(14, 8.5), sharex=True,
                                        gridspec_kw={"height_ratios": [3, 1.4, 1.4]})
    ax1.plot(ts, [n / bin_s for n in ok], lw=0.8, color="tab:blue",
             label="good responses/s (per 100 ms bin)")
    ax1.set_ylabel("requests/s")
    ax1.set_ylim(bottom=0)
    ax1.legend(loc="lower left", fontsize=8)
    ax2.bar(ts, bad, width=bin_s, color="tab:red", align="edge")
    ax2.set_ylabel("failed /100 ms")
    ax2.set_ylim(bottom=0, top=max(1, *bad) * 1.15 if bad else 1)
    ax3.plot(ts, p99_ms, lw=0.8, color="tab:gray")
    ax3.set_yscale("log")
    ax3.set_ylabel("p99 latency ms")
    if cpu:
        # CPU cores busy per second: the whole machine and this run's processes
        ax4 = ax3.twinx()
        ax4.step([c[0] for c in cpu], [c[1] for c in cpu], where="post", lw=0.8,
                 color="tab:brown", label="machine cores busy")
        ax4.step([c[0] for c in cpu], [c[2] for c in cpu], where="post", lw=0.8,
                 color="tab:olive", label="this run's cores")
        ax4.set_ylim(0, max(2.0, *(c[1] for c in cpu)) * 1.05)
        ax4.set_ylabel("CPU cores")
        ax4.legend(loc="upper right", fontsize=7)
    ax3.set_xlabel("seconds since the load started")
    top = ax1.get_ylim()[1]
    labels: list[tuple[float, str, str]] = []  # events less than 0.15 s apart share a label
    for t, kind, label in events:
        colour = _COLOURS.get(kind, "black")
        for ax in (ax1, ax2, ax3):
            ax.axvline(t, color=colour, lw=0.9, ls="--" if kind in (
                "restart", "rejoined", "sigcont", "exited", "heal") else
                ":" if kind == "phase" else "-")
        if labels and t - labels[-1][0] < 0.15:
            labels[-1] = (labels[-1][0], labels[-1][1] + ", " + label, labels[-1][2])
        else:
            labels.append((t, label, colour))
    for t, label, colour in labels:
        # vertical, along their line: events a fraction of a second apart stay legible
        ax1.text(t, top * 0.98, label + " ", color=colour, fontsize=7, va="top", ha="right",
                 rotation=90)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
