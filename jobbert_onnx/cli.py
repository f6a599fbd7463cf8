"""`jobbert-onnx`: export, encode, and build random-weight test models."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jobbert_onnx.manifest import ATTENTION_MASKS, DEFAULT_PRECISIONS, PRECISIONS, ManifestError


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
        allow_pickle=args.allow_pickle,
        attention_mask=args.attention_mask,
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


def _embed(args: argparse.Namespace) -> int:
    from jobbert_onnx.batch.embed import EmbedJob, local_encoder, report_path, run_embed

    job = EmbedJob(
        model_dir=str(args.model_dir),
        input=str(args.input),
        output=str(args.output),
        task=args.task,
        column=args.column,
        id_column=args.id_column,
        dtype=args.dtype,
        on_bad_row=args.on_bad_row,
        chunk_rows=args.chunk_rows,
        batch_size=args.batch_size,
        precision=args.precision,
    )
    job.check()
    if args.ray is not None:
        from jobbert_onnx.batch.ray_embed import ray_encoder

        address = None if args.ray == "local" else args.ray
        encode = ray_encoder(job.model_dir, job.task, job.batch_size, args.device, job.precision, address)
    else:
        encode = local_encoder(job.model_dir, job.task, job.batch_size, args.device, job.precision)
    report = run_embed(
        job,
        encode,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.quiet and sys.stderr.isatty(),
        log=lambda line: print(line, file=sys.stderr),
    )
    if not args.quiet:
        print(
            f"embedded {report.rows_out} of {report.rows_in} rows in {report.seconds:.1f}s "
            f"({len(report.skipped)} skipped, {len(report.embedded_as_empty)} embedded as empty) -> {args.output}; "
            f"report: {report_path(args.output)}",
            file=sys.stderr,
        )
    return 0


def _match(args: argparse.Namespace) -> int:
    from jobbert_onnx.batch.match import run_match

    summary = run_match(
        str(args.model_dir),
        str(args.queries),
        str(args.taxonomy),
        str(args.output),
        top_k=args.top_k,
        column=args.column,
        id_column=args.id_column,
        label_column=args.label_column,
        alt_column=args.alt_column or None,
        concept_id_column=args.concept_id_column,
        on_bad_row=args.on_bad_row,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        log=(lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr)),
    )
    if not args.quiet:
        print(
            f"matched {summary['queries']} queries against {summary['concepts']} concepts "
            f"({summary['labels']} labels), {len(summary['skipped'])} skipped -> {args.output}",
            file=sys.stderr,
        )
    return 0


def _random_model(args: argparse.Namespace) -> int:
    from jobbert_onnx.export.random_model import build_random_model

    folder = build_random_model(
        args.output_dir, size=args.size, layout=args.layout, seed=args.seed, outliers=args.outliers
    )
    with_outliers = ", with trained models' outlier dimensions" if args.outliers else ""
    print(
        f"wrote a {args.size} JobBERT-v3-shaped model with RANDOM weights ({args.layout} layout{with_outliers}) "
        f"to {folder}; its vectors carry no meaning",
        file=sys.stderr,
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    try:
        from jobbert_onnx.serve import ServeConfig
        from jobbert_onnx.serve.config import API_KEY_ENV
        from jobbert_onnx.serve.workers import serve, setup_logging
    except ImportError as error:
        raise ImportError(f"{error}; the server needs: pip install 'jobbert-onnx[serve]'") from None

    setup_logging()
    config = ServeConfig(
        model_dir=str(args.model_dir),
        host=args.host,
        port=args.port,
        devices=tuple(device.strip() for device in args.device.split(",") if device.strip()),
        workers=args.workers,
        precision=args.precision,
        threads=args.threads,
        served_model_name=args.served_model_name,
        api_key=args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV),
        max_batch_texts=args.max_batch_texts,
        max_batch_tokens=args.max_batch_tokens,
        max_wait_ms=args.max_wait_ms,
        max_inputs=args.max_inputs,
        max_chars=args.max_chars,
        max_body_bytes=args.max_body_bytes,
        max_queue_texts=args.max_queue_texts,
        body_timeout_s=args.body_timeout_s,
        log_texts=args.log_texts,
        verify=not args.no_verify,
    )
    return serve(config)


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
        help=f"encoder variants, comma-separated, from {', '.join(PRECISIONS)}; default "
        f"{','.join(DEFAULT_PRECISIONS)}, where one that misses its gate is left out with a warning (named ones fail)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing export in OUTPUT_DIR")
    export.add_argument("--validate-device", default="auto", help="where to run the validation: auto, cuda, cpu")
    export.add_argument(
        "--attention-mask",
        choices=ATTENTION_MASKS,
        help="how every encoder variant's Attention nodes take the padding mask (default: lengths-starts for fp16, "
        "which CUDA's fused attention kernels accept on every GPU; lengths for the CPU variants)",
    )
    export.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pytorch_model.bin where there is no safetensors file: this runs pickle, only for trusted files",
    )
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

    embed = commands.add_parser(
        "embed", help="embed a file of texts (.txt/.csv/.tsv/.jsonl/.parquet) into .parquet or .npy, resumably"
    )
    embed.add_argument("model_dir", type=Path)
    embed.add_argument("input", type=Path)
    embed.add_argument("output", type=Path, help=".parquet (id, text, embedding) or .npy (+ .ids.jsonl)")
    embed.add_argument("--task", required=True, help="anchor (job titles) or positive (skill lists)")
    embed.add_argument("--column", help="text column (default: the only column, or 'text')")
    embed.add_argument("--id-column", help="column kept as the row id (default: the row number)")
    embed.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    embed.add_argument("--on-bad-row", choices=["error", "skip", "empty"], default="error")
    embed.add_argument("--resume", action="store_true", help="continue an interrupted run of the same job")
    embed.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    embed.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    embed.add_argument("--device", default="auto")
    embed.add_argument("--precision", help="encoder variant (default: the fastest for the device)")
    embed.add_argument("--batch-size", type=int, default=32)
    embed.add_argument("--chunk-rows", type=int, default=8192, help="rows per part (the unit of resuming)")
    embed.add_argument(
        "--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
        help="encode on a Ray cluster (ADDRESS, e.g. ray://head:10001; none: a local instance)",
    )  # fmt: skip
    embed.set_defaults(run=_embed)

    match = commands.add_parser("match", help="match job titles to the top-k concepts of a taxonomy (e.g. ESCO)")
    match.add_argument("model_dir", type=Path)
    match.add_argument("queries", type=Path, help="titles: .txt/.csv/.tsv/.jsonl/.parquet")
    match.add_argument("taxonomy", type=Path, help="CSV/TSV of concepts: id, label, optional |-joined alternatives")
    match.add_argument("output", type=Path, help=".csv (a row per query and rank) or .jsonl (a line per query)")
    match.add_argument("--top-k", type=int, default=10)
    match.add_argument("--column", help="query text column")
    match.add_argument("--id-column", help="query id column (default: the row number)")
    match.add_argument("--concept-id-column", default="concept_uri")
    match.add_argument("--label-column", default="preferred_label")
    match.add_argument("--alt-column", default="alt_labels", help="|-joined alternative labels ('' for none)")
    match.add_argument("--on-bad-row", choices=["error", "skip"], default="error")
    match.add_argument("--device", default="auto")
    match.add_argument("--precision", help="encoder variant (default: the fastest for the device)")
    match.add_argument("--batch-size", type=int, default=32)
    match.add_argument("--quiet", action="store_true")
    match.set_defaults(run=_match)

    serve = commands.add_parser(
        "serve", help="serve POST /v1/embeddings (OpenAI-compatible) with dynamic batching (needs jobbert-onnx[serve])"
    )
    serve.add_argument("model_dir", type=Path)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8080, help="TCP port (0: any free one)")
    serve.add_argument(
        "--device", default="auto", help="auto, cpu, cuda, cuda:N, or a list (cuda:0,cuda:1): one group each"
    )
    serve.add_argument("--workers", type=int, default=1, help="processes per device, sharing the port")
    serve.add_argument("--precision", help="encoder variant (default: the fastest for the device)")
    serve.add_argument("--threads", type=int, help="onnxruntime threads per graph (default: cores / workers)")
    serve.add_argument("--served-model-name", default="jobbert-v3", help="the 'model' clients send")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $JOBBERT_ONNX_API_KEY)")
    serve.add_argument("--max-batch-texts", type=int, default=64, help="texts per device batch")
    serve.add_argument("--max-batch-tokens", type=int, default=16384, help="tokens per device batch")
    serve.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a batch waits for more requests")
    serve.add_argument("--max-inputs", type=int, default=2048, help="texts per request")
    serve.add_argument("--max-chars", type=int, default=4096, help="longer texts are cut (the model reads 64 tokens)")
    serve.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024, help="larger bodies get 413")
    serve.add_argument("--max-queue-texts", type=int, default=8192, help="beyond this many queued texts: 503")
    serve.add_argument("--body-timeout-s", type=float, default=30.0, help="slower request bodies get 408")
    serve.add_argument("--log-texts", action="store_true", help="log request texts (off by default)")
    serve.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the model files")
    serve.set_defaults(run=_serve)

    random_model = commands.add_parser(
        "random-model", help="write a JobBERT-v3-shaped model with random weights (for offline tests and benchmarks)"
    )
    random_model.add_argument("output_dir", type=Path)
    random_model.add_argument("--size", choices=["tiny", "full"], default="full")
    random_model.add_argument("--layout", choices=["router", "legacy-asym"], default="router")
    random_model.add_argument("--seed", type=int, default=0)
    random_model.add_argument(
        "--outliers",
        action="store_true",
        help="give the encoder the outlier dimensions of trained models (to prove low-precision variants on)",
    )
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
    except KeyboardInterrupt:
        print(f"jobbert-onnx {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
