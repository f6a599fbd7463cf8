"""Render benchmark results: one line per contender while running, Markdown tables at the end."""

from __future__ import annotations

from typing import Any

LATENCY_KEYS = ("p50_ms", "p90_ms", "p99_ms")


def one_line(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"{result['contender']}: FAILED: {result['error']}"
    parts = []
    for name, row in result["workloads"].items():
        best = max((t["texts_per_s"] for t in row["throughput"].values() if t), default=0.0)
        p50 = "p50 not run" if row["latency"] is None else f"p50 {row['latency']['p50_ms']:.2f} ms"
        parts.append(f"{name}: {p50}, {best:.1f} texts/s")
    return "; ".join(parts)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "not run" if value is None else f"{value:,.{digits}f}"


def _measured(value: float | None) -> str:
    return "not measured" if value is None else f"{value:,.0f}"


def _best(row: dict[str, Any]) -> float | None:
    rates = [t["texts_per_s"] for t in row["throughput"].values() if t]
    return max(rates) if rates else None


def markdown(document: dict[str, Any]) -> str:
    env = document["environment"]
    lines = [
        f"Command: `{document['command']}` ({document['total_s'] / 60:.1f} min in all)",
        "",
        f"Hardware: {env['cpu']}, {env['cores']} cores" + (f"; GPU {env['gpu']}" if env.get("gpu") else "; no GPU"),
        f"Weights: {env['weights']}. onnxruntime {env['onnxruntime']}, Python {env['python']}; "
        f"threads: {env['threads']}.",
    ]
    machine = document.get("ceilings") or {}
    if machine:
        lines.append(
            f"Ceilings on this machine (onnxruntime, 512x768x3072 product): fp32 {machine['fp32_gflops']:.0f} GFLOP/s, "
            f"int8 {machine['int8_gflops']:.0f} GOP/s."
        )
    sizes = document["batch_sizes"]
    gpu = env.get("device") == "cuda"
    lines.append(
        f"Throughput: the median of {document.get('repeats', 1)} timed run(s) per point, after an untimed run of "
        "the same call; batch 1: every timed text run once first. 'not run': outside this contender's batch sizes."
    )
    for name, workload in document["workloads"].items():
        lines += [
            "",
            f"### {name} ({workload['task']} head): {workload['texts']} texts, "
            f"{workload['mean_tokens']:.1f} tokens each on average",
            "",
            "| contender | precision | batch 1 p50 / p90 / p99 ms | "
            + " | ".join(f"texts/s @{b}" for b in sizes)
            + " | tokens/s | % of ceiling | peak RSS MiB |"
            + (" peak GPU MiB |" if gpu else "")
            + " cosine mean | cosine min |",
            "|---|---|---:|" + "---:|" * len(sizes) + "---:|---:|---:|" + ("---:|" if gpu else "") + "---:|---:|",
        ]
        for result in document["contenders"]:
            if "error" in result:
                lines.append(f"| {result['contender']} | not run: {result['error']} |")
                continue
            row = result["workloads"][name]
            latency = row["latency"]
            timed = "not run" if latency is None else " / ".join(f"{latency[k]:.2f}" for k in LATENCY_KEYS)
            rates = [(row["throughput"].get(str(b)) or {}).get("texts_per_s") for b in sizes]
            best = _best(row)
            tokens = None if best is None else best * workload["mean_tokens"]
            share = "-"
            ceiling = machine.get("int8_gflops" if result["precision"] == "int8" else "fp32_gflops")
            if best is not None and ceiling and result["device"] == "cpu" and result["precision"] != "fp16":
                share = f"{100 * best * workload['flops_per_text'] / 1e9 / ceiling:.0f}%"
            cosine = row.get("cosine") or {}
            lines.append(
                f"| {result['contender']} | {result['precision']} | "
                f"{timed} | "
                + " | ".join(_fmt(r) for r in rates)
                + f" | {_fmt(tokens, 0)} | {share} | {result['peak_rss_mib']:,.0f} | "
                + (f"{_measured(result.get('peak_gpu_mib'))} | " if gpu else "")
                + f"{_fmt(cosine.get('mean'), 7)} | {_fmt(cosine.get('min'), 7)} |"
            )
    return "\n".join(lines) + "\n"
