"""jobbert-onnx against its peers, same inputs, same run: `python -m benchmarks`.

    python -m benchmarks                      # CPU, full-size random-weight model, all contenders
    python -m benchmarks --device cuda        # GPU contenders (needs onnxruntime-gpu and a GPU)
    python -m benchmarks --quick              # small counts, for a smoke run

Builds what it needs under --work (default .bench/): a full-size JobBERT-v3-shaped
model with RANDOM weights, its export (fp16, fp32, int8), the peers' environment
and their ONNX files. Each contender runs in its own process, in order of value;
the results file is rewritten after each one (a run cut short keeps what it
measured), and with --deadline-s the contenders that no longer fit are listed as
not run. Results go to --out as JSON and a Markdown table, and nothing else: each
contender's vectors and files pass through --scratch (default: under --work), so that
--out holds only its two results files, each replaced whole, however the run ends.
"""

from __future__ import annotations

import argparse
import filecmp
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

from benchmarks import ceilings, mask_exports, peers, report, workloads
from benchmarks.files import write_whole
from benchmarks.worker import SAME_ONNXRUNTIME_ENV

ROOT = Path(__file__).resolve().parent.parent
# Every contender's vectors are compared with this one's.
REFERENCE = "sentence-transformers PyTorch fp32"
# CUDA's defaults before its token budget and finer buckets, measured against them.
COARSE_BUCKETS = [8, 16, 32, 64]
NO_BUDGET = 4096 * 64  # the largest batch the benchmark runs, at full length: no cap


def _contender(
    name: str,
    kind: str,
    env: str = "main",
    *,
    batch_sizes: list[int] | None = None,
    repeats: int | None = None,
    quality_only: bool = False,
    **options: object,
) -> dict[str, Any]:
    """One contender; `batch_sizes` and `repeats` narrow the run's own for it; a `quality_only` one only
    encodes the texts whose vectors are compared, untimed; options go to its loader."""
    found: dict[str, Any] = {"name": name, "kind": kind, "env": env, "options": options, "quality_only": quality_only}
    if batch_sizes is not None:
        found["batch_sizes"] = batch_sizes
    if repeats is not None:
        found["repeats"] = repeats
    return found


def contenders(device: str, quant_preset: str) -> list[dict[str, Any]]:
    """Every contender for one device, in order of value: name, kind, environment, options."""
    if device == "cuda":
        large = [1024, 4096]  # the default runs every batch size; its variants the large ones
        small = [32, 256]  # CUDA graphs pay for small batches
        ours = "jobbert-onnx"
        # In order of what the proof must not miss: a benchmark past its deadline starts no more.
        # The targets first: ours and the peer at the same batch sizes, then batch-1 with CUDA graphs.
        # Then each piece of the CUDA path against the default without it; the attention-mask forms
        # against the chained graphs (their copies have no merged graph), so only the form differs.
        return [
            # The fp32 reference is there for quality: it encodes the texts compared, once.
            _contender(REFERENCE, "st-torch", quality_only=True),
            # The CUDA default with a merged export (the proof's): one graph, one run per batch.
            _contender("jobbert-onnx fp16", ours, precision="fp16", merged=True),
            _contender("sentence-transformers PyTorch fp16", "st-torch", precision="fp16"),
            _contender("jobbert-onnx fp16, CUDA graphs", ours, batch_sizes=small, precision="fp16", cuda_graphs=True),
            _contender("jobbert-onnx fp16, chained graphs", ours, precision="fp16", merged=False),
            _contender(
                "jobbert-onnx fp16, chained graphs, mask 1D lengths",
                ours,
                batch_sizes=large,
                precision="fp16",
                merged=False,
                mask="lengths",
            ),
            _contender(
                "jobbert-onnx fp16, chained graphs, mask 2D",
                ours,
                batch_sizes=large,
                precision="fp16",
                merged=False,
                mask="2d",
            ),
            _contender(
                "jobbert-onnx fp16, one batch in flight",
                ours,
                batch_sizes=[32, 256, 1024],
                precision="fp16",
                in_flight=1,
            ),
            _contender(
                "jobbert-onnx fp16, buckets 8/16/32/64, no token budget",
                ours,
                batch_sizes=large,
                precision="fp16",
                buckets=COARSE_BUCKETS,
                token_budget=NO_BUDGET,
            ),
            _contender(
                "jobbert-onnx fp16, vectors into page-locked host buffers",
                ours,
                batch_sizes=large,
                precision="fp16",
                host_output=True,
            ),
            _contender(
                "jobbert-onnx fp16, padding removed (packed)", ours, batch_sizes=large, precision="fp16", packed=True
            ),
            _contender(
                "jobbert-onnx fp16, token budget 65536", ours, batch_sizes=[4096], precision="fp16", token_budget=65536
            ),
            _contender("jobbert-onnx fp16, one merged graph", "merged", batch_sizes=large, precision="fp16"),
            _contender("jobbert-onnx fp32", ours, batch_sizes=large, precision="fp32"),
        ]
    reference = _contender(REFERENCE, "st-torch")
    int8_file = peers.int8_file_name(quant_preset)
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
        _contender(
            "sentence-transformers OpenVINO int8 (static)",
            "st-openvino",
            "openvino",
            file_name="openvino/openvino_model_qint8_quantized.xml",
            precision="int8",
        ),
        _contender(
            "sentence-transformers OpenVINO",
            "st-openvino",
            "openvino",
            file_name="openvino/openvino_model.xml",
            precision="fp32",
        ),
        _contender("jobbert-onnx int8", "jobbert-onnx", precision="int8"),
        _contender("jobbert-onnx int8, sessions spinning", "jobbert-onnx", precision="int8", spinning=True),
        _contender("jobbert-onnx int8, one merged graph", "merged", precision="int8"),
        _contender("jobbert-onnx fp32", "jobbert-onnx", precision="fp32"),
        _contender("jobbert-onnx fp16", "jobbert-onnx", precision="fp16"),
    ]


def _missing(contender: dict[str, Any], device: str, export: Path) -> str | None:
    """Why `contender` cannot run here, or None. The benchmark builds no export of its own under a
    deadline: the attention-mask copies and the packed encoder come from `benchmarks.mask_exports`
    (the GPU proof makes them in its model step)."""
    options = contender["options"]
    if device == "cpu" and options.get("cuda_graphs"):
        return "CUDA graphs need a GPU"
    if device == "cpu" and options.get("packed"):
        return "the packed encoder needs a GPU"
    if options.get("packed") and not mask_exports.has_packed(export):
        return f"not run: {export} has no packed encoder; add it with python -m benchmarks.mask_exports {export} packed"
    mask = options.get("mask")
    if mask is not None and not mask_exports.has_copy(export, mask):
        return (
            f"not run: no copy of {export} with the {mask} attention mask; "
            f"make it with python -m benchmarks.mask_exports {export} {mask}"
        )
    return None


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
    export = args.export or args.work / "export"
    if (export / "manifest.json").is_file() and not _made_from(export, model):
        if args.export:
            raise SystemExit(f"{export} was exported from other weights than {model}; export {model} again")
        _log(f"{export} was made from other weights than {model}: exporting again")
        shutil.rmtree(export)
    if not (export / "manifest.json").is_file():
        if args.export:
            raise SystemExit(f"{export} is not an export folder")
        export_model(str(model), export, precision="fp16,fp32,int8", validate_device=args.device, log=_log)
    return model, export


def _made_from(export: Path, model: Path) -> bool:
    """Whether `export`'s manifest names `model`'s encoder weights (by sha256)."""
    from jobbert_onnx.manifest import sha256_file

    recorded = json.loads((export / "manifest.json").read_text())["source"]["weights_sha256"]
    return recorded.get("model.safetensors") == sha256_file(model / "model.safetensors")


def _prepare_peers(args: argparse.Namespace, model: Path) -> tuple[Path | None, str | None]:
    """The peers' python, or None and why it could not be built."""
    try:
        python = peers.ensure_env(args.work / "peer-venv")
        target = args.work / "st-onnx"
        quantized = target / "onnx" / peers.int8_file_name(peers.quantization_config())
        weights = "model.safetensors"
        if not quantized.is_file() or not filecmp.cmp(target / weights, model / weights, shallow=False):
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(model, target)
            _log("exporting with sentence-transformers' ONNX backend (plain, O3, int8) ...")
            subprocess.run(
                [str(python), "-m", "benchmarks.prepare_st_onnx", str(target), peers.quantization_config()],
                check=True,
                cwd=ROOT,
                env=_env(python),
            )
        return python, None
    except (subprocess.CalledProcessError, OSError) as error:
        return None, f"the peers' environment could not be built: {error}"


def _prepare_openvino(args: argparse.Namespace, model: Path) -> tuple[Path | None, str | None]:
    """The OpenVINO peers' python, with the model in OpenVINO IR (fp32 and static int8); or None and why not."""
    try:
        python = peers.ensure_env(args.work / "openvino-venv", peers.OPENVINO_PACKAGES)
        target = args.work / "st-openvino"
        weights = "model.safetensors"
        int8 = target / "openvino" / "openvino_model_qint8_quantized.xml"
        if not int8.is_file() or not filecmp.cmp(target / weights, model / weights, shallow=False):
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(model, target)
            _log("exporting with sentence-transformers' OpenVINO backend (fp32, static int8 with NNCF) ...")
            subprocess.run(
                [str(python), "-m", "benchmarks.prepare_openvino", str(target)], check=True, cwd=ROOT, env=_env(python)
            )
        return python, None
    except (subprocess.CalledProcessError, OSError) as error:
        return None, f"the OpenVINO peers' environment could not be built: {error}"


def _env(python: Path | None = None) -> dict[str, str]:
    """A child's environment. A worker in this Python keeps the inherited PYTHONPATH (on a GPU
    machine it is what finds onnxruntime-gpu ahead of a CPU build in site-packages) and is told
    which onnxruntime to find (`worker.check_onnxruntime`); a peer's environment gets only this
    repository, since it has its own onnxruntime."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true"}
    env.pop(SAME_ONNXRUNTIME_ENV, None)
    if python is not None and python != Path(sys.executable):
        env["PYTHONPATH"] = str(ROOT)
        return env
    import onnxruntime as ort

    env["PYTHONPATH"] = os.pathsep.join(path for path in (str(ROOT), os.environ.get("PYTHONPATH", "")) if path)
    env[SAME_ONNXRUNTIME_ENV] = json.dumps({"version": ort.__version__, "file": ort.__file__})
    return env


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
            env=_env(python),
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
    parser.add_argument("--export", type=Path, help="an export of --model to use (default: one made under --work)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--scratch", type=Path, help="the contenders' vectors and result files (default: WORK/scratch; emptied)"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--titles", type=int, default=1024)
    parser.add_argument("--skill-lists", type=int, default=256)
    parser.add_argument("--batch-sizes", help="comma-separated (default 32,256,1024; with --quick 8,16)")
    parser.add_argument("--latency-calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per throughput point (the median counts)")
    parser.add_argument(
        "--batches-per-point",
        type=int,
        help="time each batch size on its first N batches' worth of texts only (default: all texts)",
    )
    parser.add_argument("--deadline-s", type=float, help="start no contender after this many seconds")
    parser.add_argument(
        "--only",
        action="append",
        help="run only this contender (and the reference); repeat it, or separate names by commas "
        "(a name that holds a comma is given alone)",
    )
    parser.add_argument(
        "--contenders",
        choices=["cpu", "cuda"],
        help="which device's list of contenders (default: --device's); the cuda list on the CPU rehearses it",
    )
    parser.add_argument(
        "--quality-texts", type=int, help="compare vectors to the reference on the first N texts of each workload"
    )
    parser.add_argument("--no-peers", action="store_true", help="skip the contenders that need the peers' env")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per contender")
    parser.add_argument("--quick", action="store_true", help="64 titles, 16 skill lists, batches 8 and 16, 20 calls")
    parser.add_argument("--tiny", action="store_true", help="tiny random model (tests of the suite itself)")
    parser.add_argument(
        "--weights", help="what --model's weights are, for the report (default: random, as the built model's are)"
    )
    args = parser.parse_args(argv)
    if args.batches_per_point is not None and args.quality_texts is None:
        # Every point must still encode the texts whose vectors are compared with the reference.
        parser.error("--batches-per-point needs --quality-texts N (the texts compared, encoded at every point)")
    if args.quick:
        args.titles, args.skill_lists, args.latency_calls = 64, 16, 20
    batch_sizes = [int(b) for b in (args.batch_sizes or ("8,16" if args.quick else "32,256,1024")).split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = args.scratch or args.work / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
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

    chosen = contenders(args.contenders or args.device, peers.quantization_config())
    if args.only:
        known = {c["name"].lower() for c in chosen}
        keys = {
            key.strip()
            for value in args.only
            for key in ([value.lower()] if value.strip().lower() in known else value.lower().split(","))
        }
        if keys - known:
            raise SystemExit(f"--only: no contender named {', '.join(sorted(keys - known))}; known: {sorted(known)}")
        chosen = [c for c in chosen if c["name"] == REFERENCE or c["name"].lower() in keys]
    pythons: dict[str, Path | None] = {"main": Path(sys.executable), "peers": None, "openvino": None}
    problems = {"peers": "skipped (--no-peers)", "openvino": "skipped (--no-peers)"}
    if not args.no_peers and any(c["env"] == "peers" for c in chosen):
        pythons["peers"], problems["peers"] = _prepare_peers(args, model)  # type: ignore[assignment]
    if not args.no_peers and any(c["env"] == "openvino" for c in chosen):
        pythons["openvino"], problems["openvino"] = _prepare_openvino(args, model)  # type: ignore[assignment]

    results: list[dict[str, Any]] = []
    document: dict[str, Any] = {
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
        "batches_per_point": args.batches_per_point,
        "repeats": args.repeats,
        "latency_calls": args.latency_calls,
        # Every contender meant to run, in order: a run cut short shows which were not reached.
        "planned": [c["name"] for c in chosen],
        "contenders": results,
    }
    for contender in chosen:
        slug = _slug(contender["name"])
        options = dict(contender["options"])
        mask = options.pop("mask", None)
        if mask is not None:
            options["export"] = str(mask_exports.copy_path(export, mask))
        config = {
            **contender,
            "options": options,
            "slug": slug,
            "device": args.device,
            "model": str(model),
            "export": str(export),
            "st_onnx": str(args.work / "st-onnx"),
            "st_openvino": str(args.work / "st-openvino"),
            "workloads": {name: {"task": s["task"], "texts": s["texts"]} for name, s in texts.items()},
            "batch_sizes": batch_sizes,
            "contender_batch_sizes": [b for b in contender.get("batch_sizes", batch_sizes) if b in batch_sizes]
            or batch_sizes[:1],
            "contender_repeats": contender.get("repeats"),
            "quality_only": contender.get("quality_only", False),
            "quality_texts": args.quality_texts,
            "repeats": args.repeats,
            "batches_per_point": args.batches_per_point,
            "latency_calls": args.latency_calls,
            "out": str(scratch),
        }
        python = pythons[contender["env"]]
        elapsed = time.perf_counter() - started
        missing = _missing(contender, args.device, export)
        if missing is not None:
            results.append({"contender": contender["name"], "error": missing})
        elif args.deadline_s is not None and elapsed > args.deadline_s:
            late = f"past the {args.deadline_s:.0f} s deadline"
            results.append({"contender": contender["name"], "error": late})
        elif python is None:
            results.append({"contender": contender["name"], "error": problems[contender["env"]]})
            _log(f"{contender['name']}: not run: {problems[contender['env']]}")
        else:
            _log(f"running {contender['name']} ...")
            results.append(_run_contender(config, python, args.timeout))
            _log(f"  {report.one_line(results[-1])}")
        _quality(results, scratch, texts)
        _write(document, args, started)
        if contender["name"] == REFERENCE and "error" in results[-1]:
            _log("the fp32 reference failed, so no contender's quality can be measured: stopping")
            break

    shutil.rmtree(scratch, ignore_errors=True)
    print(_write(document, args, started))
    return 0


def _write(document: dict[str, Any], args: argparse.Namespace, started: float) -> str:
    """Write the results as they stand (JSON and Markdown); return the Markdown."""
    document["total_s"] = time.perf_counter() - started
    stem = f"bench-{args.device}"
    write_whole(args.out / f"{stem}.json", json.dumps(document, indent=2) + "\n")
    table = report.markdown(document)
    write_whole(args.out / f"{stem}.md", table)
    return table


def _quality(results: list[dict[str, Any]], out: Path, texts: dict[str, Any]) -> None:
    """Cosine of every contender's vectors to the fp32 PyTorch reference's, per head."""
    from jobbert_onnx.vectors import row_cosines

    for name in texts:
        reference_path = out / f"{_slug(REFERENCE)}.{name}.npy"
        if not reference_path.is_file():
            continue
        reference = np.load(reference_path)
        for result in results:
            mine = out / f"{_slug(result['contender'])}.{name}.npy"
            if "error" in result or not mine.is_file() or "cosine" in result["workloads"][name]:
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
        "weights": args.weights or ("random (tiny)" if args.tiny else "random (full-size JobBERT-v3 architecture)"),
    }


if __name__ == "__main__":
    sys.exit(main())
