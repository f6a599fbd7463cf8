"""jobbert-onnx against its peers, same inputs, same run: `python -m benchmarks`.

    python -m benchmarks                      # CPU, full-size random-weight model, all contenders
    python -m benchmarks --device cuda        # GPU contenders (needs onnxruntime-gpu and a GPU)
    python -m benchmarks --quick              # small counts, for a smoke run

Builds what it needs under --work (default .bench/): a full-size JobBERT-v3-shaped
model with RANDOM weights, its export (fp16, fp32, int8), the peers' environment
and their ONNX files. Each contender runs in its own process; results go to
--out as JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import ceilings, peers, report, workloads

ROOT = Path(__file__).resolve().parent.parent
# Every contender's vectors are compared with this one's.
REFERENCE = "sentence-transformers PyTorch fp32"


def _contender(name: str, kind: str, env: str = "main", **options: object) -> dict[str, Any]:
    return {"name": name, "kind": kind, "env": env, "options": options}


def contenders(device: str, quant_preset: str) -> list[dict[str, Any]]:
    """Every contender for one device: name, kind, environment, options."""
    reference = _contender(REFERENCE, "st-torch")
    if device == "cuda":
        return [
            reference,
            _contender("sentence-transformers PyTorch fp16", "st-torch", precision="fp16"),
            _contender("jobbert-onnx fp16", "jobbert-onnx", precision="fp16"),
            _contender("jobbert-onnx fp16, CUDA graphs", "jobbert-onnx", precision="fp16", cuda_graphs=True),
            _contender("jobbert-onnx fp32", "jobbert-onnx", precision="fp32"),
            _contender("jobbert-onnx fp16, one merged graph", "merged", precision="fp16"),
        ]
    int8_file = f"model_qint8_{quant_preset}.onnx"
    return [
        reference,
        _contender("sentence-transformers ONNX", "st-onnx", "peers", file_name="model.onnx", precision="fp32"),
        _contender("sentence-transformers ONNX O3", "st-onnx", "peers", file_name="model_O3.onnx", precision="fp32"),
        _contender(
            f"sentence-transformers ONNX int8 ({quant_preset})",
            "st-onnx",
            "peers",
            file_name=int8_file,
            precision="int8",
        ),
        _contender("Optimum ORTModelForFeatureExtraction", "optimum", "peers"),
        _contender("jobbert-onnx int8", "jobbert-onnx", precision="int8"),
        _contender("jobbert-onnx int8, sessions spinning", "jobbert-onnx", precision="int8", spinning=True),
        _contender("jobbert-onnx int8, one merged graph", "merged", precision="int8"),
        _contender("jobbert-onnx fp32", "jobbert-onnx", precision="fp32"),
        _contender("jobbert-onnx fp16", "jobbert-onnx", precision="fp16"),
    ]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _prepare(args: argparse.Namespace) -> tuple[Path, Path]:
    from jobbert_onnx.export import export_model
    from jobbert_onnx.export.random_model import build_random_model

    model = args.model or args.work / "model"
    if not (model / "modules.json").is_file():
        if args.model:
            raise SystemExit(f"{model} is not a sentence-transformers folder")
        print(f"building a full-size model with RANDOM weights in {model} ...", file=sys.stderr)
        build_random_model(model, size="tiny" if args.tiny else "full", layout="router", seed=0)
    export = args.work / "export"
    if not (export / "manifest.json").is_file():
        export_model(str(model), export, precision="fp16,fp32,int8", validate_device=args.device, log=_log)
    return model, export


def _prepare_peers(args: argparse.Namespace, model: Path) -> tuple[Path | None, str | None]:
    """The peers' python, or None and why it could not be built."""
    try:
        python = peers.ensure_env(args.work / "peer-venv")
        target = args.work / "st-onnx"
        if not (target / "onnx" / f"model_qint8_{peers.quantization_config()}.onnx").is_file():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(model, target)
            _log("exporting with sentence-transformers' ONNX backend (plain, O3, int8) ...")
            subprocess.run(
                [str(python), "-m", "benchmarks.prepare_st_onnx", str(target), peers.quantization_config()],
                check=True,
                cwd=ROOT,
                env=_env(),
            )
        return python, None
    except (subprocess.CalledProcessError, OSError) as error:
        return None, f"the peers' environment could not be built: {error}"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "true"}


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _run_contender(config: dict[str, Any], python: Path, timeout: float) -> dict[str, Any]:
    path = Path(config["out"]) / f"{config['slug']}.config.json"
    path.write_text(json.dumps(config))
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [str(python), "-m", "benchmarks.worker", str(path)],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"contender": config["name"], "error": f"did not finish within {timeout:.0f}s"}
    finally:
        path.unlink(missing_ok=True)
    result_path = Path(config["out"]) / f"{config['slug']}.json"
    if done.returncode != 0 or not result_path.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"contender": config["name"], "error": " | ".join(tail) or f"exit {done.returncode}"}
    result: dict[str, Any] = json.loads(result_path.read_text())
    result_path.unlink()
    result["wall_s"] = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="sentence-transformers folder (default: a random full-size one)")
    parser.add_argument("--work", type=Path, default=ROOT / ".bench", help="where models, exports, envs are kept")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--titles", type=int, default=1024)
    parser.add_argument("--skill-lists", type=int, default=256)
    parser.add_argument("--batch-sizes", help="comma-separated (default 32,256,1024; with --quick 8,16)")
    parser.add_argument("--latency-calls", type=int, default=200)
    parser.add_argument("--only", help="comma-separated substrings: run only contenders whose name has one")
    parser.add_argument("--no-peers", action="store_true", help="skip the contenders that need the peers' env")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per contender")
    parser.add_argument("--quick", action="store_true", help="64 titles, 16 skill lists, batches 8 and 16, 20 calls")
    parser.add_argument("--tiny", action="store_true", help="tiny random model (tests of the suite itself)")
    args = parser.parse_args(argv)
    if args.quick:
        args.titles, args.skill_lists, args.latency_calls = 64, 16, 20
    batch_sizes = [int(b) for b in (args.batch_sizes or ("8,16" if args.quick else "32,256,1024")).split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    model, export = _prepare(args)
    from jobbert_onnx.manifest import read_manifest

    manifest = read_manifest(export)
    arch = manifest.raw["architecture"]
    texts = {
        "titles": {"task": "anchor", "texts": workloads.titles(args.titles)},
        "skill_lists": {
            "task": "positive",
            "texts": workloads.skill_lists(args.skill_lists, export / "tokenizer.json"),
        },
    }
    from jobbert_onnx.runtime.tokenize import TextTokenizer

    tokenizer = TextTokenizer(export / "tokenizer.json", manifest.max_seq_length)
    for spec in texts.values():
        lengths = tokenizer.tokenize(spec["texts"]).lengths
        spec["tokens"] = int(lengths.sum())
        spec["flops_per_text"] = ceilings.flops_per_text(
            lengths, arch["layers"], arch["hidden_size"], arch["intermediate_size"], arch["output_dim"]
        )

    _log("measuring this machine's matrix-product ceilings ...")
    machine = ceilings.measure(0.5 if args.quick else 3.0) if args.device == "cpu" else {}

    chosen = contenders(args.device, peers.quantization_config())
    if args.only:
        keys = [k.strip().lower() for k in args.only.split(",")]
        chosen = [c for c in chosen if c["name"] == REFERENCE or any(k in c["name"].lower() for k in keys)]
    peer_python, peer_problem = (None, "skipped (--no-peers)") if args.no_peers else (None, None)
    if not args.no_peers and any(c["env"] == "peers" for c in chosen):
        peer_python, peer_problem = _prepare_peers(args, model)

    results = []
    for contender in chosen:
        slug = _slug(contender["name"])
        config = {
            **contender,
            "slug": slug,
            "device": args.device,
            "model": str(model),
            "export": str(export),
            "st_onnx": str(args.work / "st-onnx"),
            "workloads": {name: {"task": s["task"], "texts": s["texts"]} for name, s in texts.items()},
            "batch_sizes": batch_sizes,
            "latency_calls": args.latency_calls,
            "out": str(args.out),
        }
        python = Path(sys.executable) if contender["env"] == "main" else peer_python
        if python is None:
            results.append({"contender": contender["name"], "error": peer_problem})
            _log(f"{contender['name']}: not run: {peer_problem}")
            continue
        _log(f"running {contender['name']} ...")
        result = _run_contender(config, python, args.timeout)
        results.append(result)
        _log(f"  {report.one_line(result)}")

    _quality(results, args.out, texts)
    for stale in args.out.glob("*.npy"):
        stale.unlink()
    document = {
        "command": " ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]),
        "environment": _environment(args, model),
        "ceilings": machine,
        "workloads": {
            name: {
                "task": s["task"],
                "texts": len(s["texts"]),
                "mean_tokens": s["tokens"] / len(s["texts"]),
                "flops_per_text": s["flops_per_text"],
            }
            for name, s in texts.items()
        },
        "batch_sizes": batch_sizes,
        "latency_calls": args.latency_calls,
        "contenders": results,
        "total_s": time.perf_counter() - started,
    }
    stem = f"bench-{args.device}"
    (args.out / f"{stem}.json").write_text(json.dumps(document, indent=2) + "\n")
    table = report.markdown(document)
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    return 0


def _quality(results: list[dict[str, Any]], out: Path, texts: dict[str, Any]) -> None:
    """Cosine of every contender's vectors to the fp32 PyTorch reference's, per head."""
    from jobbert_onnx.export.validate import row_cosines

    for name in texts:
        reference_path = out / f"{_slug(REFERENCE)}.{name}.npy"
        if not reference_path.is_file():
            continue
        reference = np.load(reference_path)
        for result in results:
            mine = out / f"{_slug(result['contender'])}.{name}.npy"
            if "error" in result or not mine.is_file():
                continue
            cos = row_cosines(np.load(mine), reference)
            result["workloads"][name]["cosine"] = {"mean": float(cos.mean()), "min": float(cos.min())}


def _environment(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    import onnxruntime as ort

    cpu = "unknown"
    if Path("/proc/cpuinfo").is_file():
        names = [
            ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln
        ]
        cpu = names[0] if names else cpu
    gpu = None
    if args.device == "cuda" and shutil.which("nvidia-smi"):
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "device": args.device,
        "threads": "onnxruntime and torch defaults (one per core)",
        "model": str(model),
        "weights": "random (full-size JobBERT-v3 architecture)" if not args.tiny else "random (tiny)",
    }


if __name__ == "__main__":
    sys.exit(main())
