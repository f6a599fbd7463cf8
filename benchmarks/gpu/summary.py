"""The GPU proof's readable summary (summary.md), from its facts (proof.json) and the benchmark's results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OURS = "jobbert-onnx fp16"
GRAPHS = "jobbert-onnx fp16, CUDA graphs"
PEER = "sentence-transformers PyTorch fp16"


def targets(bench: dict[str, Any] | None, rehearsal: bool) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for the GPU targets, from one benchmark document."""
    rows: list[tuple[str, str, str]] = []
    names = [
        "titles >= 150,000 texts/s",
        "skill lists >= 30,000 texts/s",
        "batch-1 p50 <= 0.4 ms",
        "titles >= 3x sentence-transformers fp16",
        "fp16 cosine mean >= 0.9999, min >= 0.999",
    ]
    if bench is None or rehearsal:
        why = "not measured (rehearsal on the CPU)" if rehearsal else "not measured"
        return [(name, why, "-") for name in names]
    found = {c["contender"]: c for c in bench["contenders"] if "error" not in c}

    def best(name: str, workload: str) -> float | None:
        row = found.get(name, {}).get("workloads", {}).get(workload)
        rates = [t["texts_per_s"] for t in (row or {}).get("throughput", {}).values() if t]
        return max(rates) if rates else None

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("met" if ok else "missed")

    for workload, floor, name in (("titles", 150_000, names[0]), ("skill_lists", 30_000, names[1])):
        rate = best(OURS, workload)
        shown = "not measured" if rate is None else f"{rate:,.0f} texts/s"
        rows.append((name, shown, verdict(None if rate is None else rate >= floor)))
    p50s = {n: found[n]["workloads"]["titles"]["latency"]["p50_ms"] for n in (OURS, GRAPHS) if n in found}
    fastest = min(p50s.values()) if p50s else None
    shown = ", ".join(f"{v:.3f} ms ({'CUDA graphs' if n == GRAPHS else 'default'})" for n, v in p50s.items())
    rows.append((names[2], shown or "not measured", verdict(None if fastest is None else fastest <= 0.4)))
    # Both ran the same batch sizes: each at its best of them.
    ours, peer = best(OURS, "titles"), best(PEER, "titles")
    ratio = None if not ours or not peer else ours / peer
    rows.append(
        (names[3], "not measured" if ratio is None else f"{ratio:.2f}x", verdict(None if ratio is None else ratio >= 3))
    )
    cosines = [found.get(OURS, {}).get("workloads", {}).get(w, {}).get("cosine") for w in ("titles", "skill_lists")]
    if all(cosines):
        mean, least = min(c["mean"] for c in cosines if c), min(c["min"] for c in cosines if c)
        rows.append((names[4], f"mean {mean:.6f}, min {least:.6f}", verdict(mean >= 0.9999 and least >= 0.999)))
    else:
        rows.append((names[4], "not measured", "not measured"))
    return rows


def ratios(bench: dict[str, Any] | None) -> list[str]:
    """Ours against the peer per workload and batch size, where both ran it (Markdown rows)."""
    found = {c["contender"]: c for c in (bench or {}).get("contenders", []) if "error" not in c}
    if OURS not in found or PEER not in found:
        return []
    rows = []
    for workload, row in found[OURS]["workloads"].items():
        theirs = found[PEER]["workloads"].get(workload, {}).get("throughput", {})
        for size, point in row["throughput"].items():
            other = theirs.get(size)
            if point and other:
                rows.append(
                    f"| {workload.replace('_', ' ')} | {size} | {point['texts_per_s']:,.0f} | "
                    f"{other['texts_per_s']:,.0f} | {point['texts_per_s'] / other['texts_per_s']:.2f}x |"
                )
    return rows


def not_reached(bench: dict[str, Any] | None) -> list[str]:
    """Contenders the benchmark meant to run and has no result for (it was stopped before them)."""
    if bench is None:
        return []
    done = {c["contender"] for c in bench["contenders"]}
    return [name for name in bench.get("planned", []) if name not in done]


def _peer_facts(bench: dict[str, Any] | None) -> list[str]:
    lines = []
    for result in (bench or {}).get("contenders", []):
        if result.get("kind") == "st-torch" and "error" not in result:
            lines.append(
                f"- {result['contender']}: dtype {result.get('dtype')}, parameters {result.get('parameter_dtypes')}, "
                f"TF32 found {result.get('tf32', {}).get('found')}, ran with {result.get('tf32', {}).get('ran_with')}"
            )
    return lines


def summary(facts: dict[str, Any], out: Path) -> str:
    steps = facts["steps"]
    env = steps.get("environment", {}).get("facts", {})
    lines = [
        f"# GPU proof: {facts['mode']}",
        "",
        f"Started {facts['started']}, {facts.get('total_s', 0):.0f} s in all. "
        f"GPU: {env.get('gpu') or 'none'}; CUDA (driver) {env.get('driver_cuda') or '-'}; "
        f"onnxruntime {env.get('onnxruntime', '?')} with {', '.join(env.get('providers', []))}; "
        f"torch {env.get('versions', {}).get('torch')} (CUDA {env.get('torch_cuda')}); CPU {env.get('cpu')}, "
        f"{env.get('cores')} cores. Weights: RANDOM (JobBERT-v3 architecture).",
        "",
        "| step | status | seconds |",
        "|---|---|---:|",
    ]
    lines += [f"| {name} | {step['status']} | {step.get('seconds', '-')} |" for name, step in steps.items()]
    own = facts.get("proof_process", {})
    if own:
        found = own.get("onnxruntime")
        shown = f"{found['version']} from {found['file']}" if isinstance(found, dict) else found
        lines += ["", f"The proof's onnxruntime (every child checks it imports the same): {shown}."]
    if env.get("cuda_libraries_loaded"):
        lines += ["", "CUDA libraries loaded: " + ", ".join(Path(p).name for p in env["cuda_libraries_loaded"])]
    model = steps.get("model", {})
    if model.get("validation"):
        lines += ["", "## Export validation (cosine to PyTorch fp32)", "", "| variant | device | head | min | mean |"]
        lines.append("|---|---|---|---:|---:|")
        for name, variant in model["validation"].items():
            for head, figures in variant["heads"].items():
                lines.append(
                    f"| {name} | {variant['device']} | {head} | "
                    f"{figures['min_cosine']:.7f} | {figures['mean_cosine']:.7f} |"
                )
    tests = steps.get("tests", {}).get("tests")
    if tests:
        lines += ["", f"## GPU tests: {json.dumps(tests)}"]
    placement = steps.get("placement", {}).get("placement")
    if placement:
        lines += [
            "",
            f"## Placement ({placement['device']})",
            "",
            "| graph | nodes per provider | on the CPU | Memcpy |",
        ]
        lines.append("|---|---|---|---:|")
        for graph, where in placement["graphs"].items():
            lines.append(
                f"| {graph} | {where['nodes_per_provider']} | {where['cpu_nodes']} | {where['memcpy_nodes']} |"
            )
        lines += ["", "| attention mask | kernel | non-finite values at padded positions |", "|---|---|---:|"]
        for form, seen in placement["attention"].items():
            kernels = "<br>".join(seen["kernel_lines"])
            lines.append(f"| {form} | {kernels} | {seen['nonfinite_at_padded_positions']} |")
    graphs = steps.get("capture", {}).get("cuda_graphs")
    if graphs:
        lines += ["", "## CUDA graphs per shape"]
        if graphs.get("status") != "ok":
            lines += ["", graphs["status"]]
        else:
            shapes = graphs["shapes"]
            bad = {k: v["error"] for k, v in shapes.items() if not v["captured"]}
            lines += [
                "",
                f"{len(shapes) - len(bad)} of {len(shapes)} shapes probed were captured and replayed correctly "
                f"(the runtime captures at most {graphs.get('limit', '?')}; {graphs.get('not_probed', '?')} "
                "larger shapes, which it would run without a graph, were not probed).",
            ]
            lines += [f"- {shape}: {error}" for shape, error in bad.items()]
            lines += ["", "| shape | replay ms | no graph ms |", "|---|---:|---:|"]
            lines += [
                f"| {k} | {v['replay_ms']:.3f} | {v['plain_ms']:.3f} |" for k, v in shapes.items() if v["captured"]
            ]
    outliers = steps.get("outliers", {})
    if isinstance(outliers.get("fp16"), dict):
        fp16 = outliers["fp16"]
        lines += [
            "",
            f"## fp16 on the outlier replica ({outliers['model']}), cosine to PyTorch fp32 on {fp16['device']}",
            "",
            "| encoder | head | min | mean | largest length error | gate (min, mean) |",
            "|---|---|---:|---:|---:|---|",
        ]
        gate = f"{fp16['min_cosine_required']}, {fp16['mean_cosine_required']}"
        for form, heads in (("fp16", fp16["heads"]), ("fp16 packed", fp16.get("packed", {}).get("heads", {}))):
            for head, f in heads.items():
                lines.append(
                    f"| {form} | {head} | {f['min_cosine']:.7f} | {f['mean_cosine']:.7f} | "
                    f"{f['max_norm_error']:.2e} | {gate} |"
                )
        for note in (fp16.get("note"), fp16.get("packed", {}).get("note")):
            if note:
                lines.append(f"\n{note}")
    bench = _bench(out)
    lines += ["", "## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in targets(bench, facts["mode"].startswith("rehearsal"))]
    per_size = ratios(bench)
    if per_size:
        lines += ["", f"{OURS} against {PEER}, same texts, same batch sizes:", ""]
        lines += ["| workload | batch | ours texts/s | peer texts/s | ratio |", "|---|---:|---:|---:|---:|"]
        lines += per_size
    peers = _peer_facts(bench)
    if peers:
        lines += ["", *peers]
    missing = not_reached(bench)
    if missing:
        lines += ["", "Not measured (the benchmark stopped before them): " + "; ".join(missing) + "."]
    if bench is not None:
        table = next(out.glob("bench-*.md"), None)
        lines += ["", "## Benchmark", "", table.read_text() if table else ""]
    profile = steps.get("profile", {}).get("profile")
    if profile:
        lines += ["", f"## Profile ({profile['device']})", "", "| call | " + " | ".join(_split_keys(profile)) + " |"]
        lines.append("|---|" + "---:|" * len(_split_keys(profile)))
        for call, split in profile["split_ms"].items():
            lines.append(f"| {call} | " + " | ".join(f"{split.get(k, 0):.3f}" for k in _split_keys(profile)) + " |")
        per_call = profile["per_call"]
        if isinstance(per_call, dict):
            lines += ["", "| call | wall ms | CPU ms | launches |", "|---|---:|---:|---|"]
            for call, seen in per_call.items():
                lines.append(f"| {call} | {seen['wall_ms']:.3f} | {seen['cpu_ms']:.3f} | {seen['launches']} |")
        else:
            lines += ["", f"Launches and CPU time per call: {per_call}."]
        ceiling = profile["fp16_ceiling_tflops"]
        shown = f"{ceiling:.0f} TFLOP/s" if isinstance(ceiling, float) else ceiling
        lines += [f"fp16 matrix-product ceiling (8192^3 through torch): {shown}."]
        lines += _achieved(bench, profile)
    return "\n".join(lines) + "\n"


def _split_keys(profile: dict[str, Any]) -> list[str]:
    return list(next(iter(profile["split_ms"].values())))


def _achieved(bench: dict[str, Any] | None, profile: dict[str, Any]) -> list[str]:
    ceiling = profile.get("fp16_ceiling_tflops")
    if bench is None or not isinstance(ceiling, float):
        return []
    lines = []
    for result in bench["contenders"]:
        if result.get("contender") != OURS or "error" in result:
            continue
        for name, row in result["workloads"].items():
            rates = [t["texts_per_s"] for t in row["throughput"].values() if t]
            if rates:
                tflops = max(rates) * bench["workloads"][name]["flops_per_text"] / 1e12
                lines.append(f"{OURS}, {name}: {tflops:.1f} TFLOP/s achieved, {100 * tflops / ceiling:.0f}% of it.")
    return lines


def _bench(out: Path) -> dict[str, Any] | None:
    found = next(out.glob("bench-*.json"), None)
    return json.loads(found.read_text()) if found else None
