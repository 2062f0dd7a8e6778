"""PNG plots of runs (matplotlib, Agg backend, imported only when a plot is asked for)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from turbofleet.bench.stats import Timeline, throughput_series


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on bench boxes
    import matplotlib.pyplot as plt

    return plt


def plot_runs(runs: Mapping[str, Sequence[Timeline]], out_dir: str | Path, title: str = "") -> list[Path]:
    """Write ttft_cdf.png and throughput.png with one line per run (router) on the same axes."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, results in runs.items():
        xs = sorted((r.chunk_times[0] - r.start) * 1e3 for r in results if r.error is None and r.chunk_times)
        if xs:
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"TTFT CDF {title}".strip())
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    written.append(out / "ttft_cdf.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, results in runs.items():
        series = throughput_series(results, bucket_s=1.0)
        if series:
            ax.plot([t for t, _ in series], [v for _, v in series], label=name)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("output tokens/s (1 s buckets)")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"Throughput over time {title}".strip())
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    written.append(out / "throughput.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def plot_overhead(rows: Sequence[Mapping[str, Any]], out_dir: str | Path) -> Path:
    """Bar chart of max req/s per router from the overhead bench."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [f"{r['router']}{' (stream)' if r.get('stream') else ''}" for r in rows]
    ax.barh(names, [r.get("requests_per_s") or 0 for r in rows])
    ax.set_xscale("log")
    ax.set_xlabel("requests/s (log scale)")
    ax.set_title("Router overhead: max throughput, instant backends")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    path = out / "overhead.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
