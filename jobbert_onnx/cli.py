"""`jobbert-onnx`: export, encode, and build random-weight test models."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jobbert_onnx.manifest import ManifestError


def _export(args: argparse.Namespace) -> int:
    from jobbert_onnx.export import export_model

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    export_model(
        args.source,
        args.output_dir,
        revision=args.revision,
        precision=args.precision,
        overwrite=args.overwrite,
        validate_device=args.validate_device,
        log=log,
    )
    return 0


def _encode(args: argparse.Namespace) -> int:
    from jobbert_onnx.runtime import Encoder

    texts = list(args.texts) if args.texts else [line.rstrip("\n") for line in sys.stdin]
    encoder = Encoder.load(args.model_dir, device=args.device, precision=args.precision)
    vectors = encoder.encode(
        texts,
        task=args.task,
        batch_size=args.batch_size,
        normalize_embeddings=args.normalize,
        show_progress_bar=args.progress,
    )
    if args.output and args.output.suffix == ".npy":
        np.save(args.output, vectors)
        print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} vectors to {args.output}", file=sys.stderr)
        return 0
    stream = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for text, vector in zip(texts, vectors, strict=True):
            stream.write(json.dumps({"text": text, "embedding": [round(float(x), 7) for x in vector]}) + "\n")
    finally:
        if stream is not sys.stdout:
            stream.close()
    return 0


def _random_model(args: argparse.Namespace) -> int:
    from jobbert_onnx.export.random_model import build_random_model

    folder = build_random_model(args.output_dir, size=args.size, layout=args.layout, seed=args.seed)
    print(
        f"wrote a {args.size} JobBERT-v3-shaped model with RANDOM weights ({args.layout} layout) to {folder}; "
        "its vectors carry no meaning",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobbert-onnx", description="JobBERT-v3 as ONNX graphs, encoded without torch."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="export a model to validated ONNX graphs (needs jobbert-onnx[export])")
    export.add_argument("source", help="hub id (e.g. TechWolf/JobBERT-v3) or local sentence-transformers folder")
    export.add_argument("output_dir", type=Path)
    export.add_argument("--revision", help="branch, tag or commit of the hub repository")
    export.add_argument(
        "--precision",
        default="fp16,int8",
        help="encoder variants, comma-separated, from fp16 (GPU), fp32, int8 (CPU); default fp16,int8",
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing export in OUTPUT_DIR")
    export.add_argument("--validate-device", default="auto", help="where to run the validation: auto, cuda, cpu")
    export.set_defaults(run=_export)

    encode = commands.add_parser(
        "encode", help="encode texts (arguments, or one per line on stdin) to JSON lines or .npy"
    )
    encode.add_argument("model_dir", type=Path)
    encode.add_argument("texts", nargs="*", help="texts to encode; read from stdin, one per line, if none")
    encode.add_argument("--task", default=None, help="anchor (job titles) or positive (skill lists); default: anchor")
    encode.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    encode.add_argument("--precision", help="encoder variant: fp16, fp32 or int8 (default: the fastest for the device)")
    encode.add_argument("--batch-size", type=int, default=32)
    encode.add_argument("--normalize", action="store_true", help="unit-length vectors")
    encode.add_argument("--progress", action="store_true", help="progress bar on stderr")
    encode.add_argument("-o", "--output", type=Path, help="write .npy or .jsonl here instead of JSON lines on stdout")
    encode.set_defaults(run=_encode)

    random_model = commands.add_parser(
        "random-model", help="write a JobBERT-v3-shaped model with random weights (for offline tests and benchmarks)"
    )
    random_model.add_argument("output_dir", type=Path)
    random_model.add_argument("--size", choices=["tiny", "full"], default="full")
    random_model.add_argument("--layout", choices=["router", "legacy-asym"], default="router")
    random_model.add_argument("--seed", type=int, default=0)
    random_model.set_defaults(run=_random_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `jobbert-onnx` command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (ManifestError, FileExistsError, ValueError, TypeError, RuntimeError, ImportError) as error:
        print(f"jobbert-onnx {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
