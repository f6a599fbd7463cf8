"""`jobbert-onnx`: export, encode, and build test models (random weights, or a trained encoder wrapped)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jobbert_onnx.cache import CACHE_ENV
from jobbert_onnx.errors import JobbertOnnxError, missing_extra
from jobbert_onnx.manifest import ATTENTION_MASKS, DEFAULT_PRECISIONS, PRECISIONS

DEVICE_HELP = "auto (CUDA when it loads, else the CPU), cuda, cuda:N or cpu"
BATCH_SIZE_HELP = "most texts per graph run (default: 32 on the CPU; on CUDA as many as 32,768 tokens hold)"
CACHE_HELP = f"${CACHE_ENV}, $HF_HOME/jobbert-onnx, $XDG_CACHE_HOME/jobbert-onnx or ~/.cache/jobbert-onnx"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _export(args: argparse.Namespace) -> int:
    try:
        from jobbert_onnx.export import export_model
    except ImportError as error:
        raise missing_extra("export", "export", error) from None

    export_model(
        args.source,
        args.output_dir,
        revision=args.revision,
        precision=args.precision,
        overwrite=args.overwrite,
        validate_device=args.validate_device,
        log=_stderr,
        allow_pickle=args.allow_pickle,
        attention_mask=args.attention_mask,
        merged=args.merged,
        packed=args.packed,
    )
    return 0


def _encode(args: argparse.Namespace) -> int:
    from jobbert_onnx.runtime import Encoder

    texts = list(args.texts) if args.texts else [line.rstrip("\n") for line in sys.stdin]
    encoder = Encoder.load(_export_folder(args), device=args.device, precision=args.precision)
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
        model_dir=_export_folder(args),
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
        log=_stderr,
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
        _export_folder(args),
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
        log=(lambda line: None) if args.quiet else _stderr,
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
        raise missing_extra("the server", "serve", error) from None

    setup_logging()
    config = ServeConfig(
        model_dir=_export_folder(args),
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
        cache_size=args.cache_size,
        log_texts=args.log_texts,
        verify=not args.no_verify,
    )
    return serve(config)


def _defaults(kind: Any) -> dict[str, Any]:
    """The default of every field of a dataclass, or of every keyword parameter of a function."""
    if dataclasses.is_dataclass(kind):
        return {f.name: f.default for f in dataclasses.fields(kind) if f.default is not dataclasses.MISSING}
    return {
        name: p.default
        for name, p in inspect.signature(kind).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _model_options(parser: argparse.ArgumentParser, *, batch_size: bool = True, device_help: str = DEVICE_HELP) -> None:
    """MODEL and the options every command that loads a model shares."""
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="an export folder, a sentence-transformers folder, or a hub id (e.g. TechWolf/JobBERT-v3); "
        "the last two are exported once into the cache (needs jobbert-onnx[export])",
    )
    parser.add_argument("--revision", help="branch, tag or commit, when MODEL is a hub id")
    parser.add_argument("--cache-dir", type=Path, help=f"where exports of MODEL are cached (default: {CACHE_HELP})")
    parser.add_argument("--device", default="auto", help=device_help)
    parser.add_argument(
        "--precision", choices=PRECISIONS, help="encoder variant (default: fp16 on CUDA; on the CPU the fastest held)"
    )
    if batch_size:
        parser.add_argument("--batch-size", type=int, help=BATCH_SIZE_HELP)


def _export_folder(args: argparse.Namespace) -> str:
    """The export folder for MODEL: itself, or its cached export (made now if needed)."""
    from jobbert_onnx.cache import resolve_model

    return str(
        resolve_model(
            args.model, revision=args.revision, precision=args.precision, cache_dir=args.cache_dir, log=_stderr
        ).folder
    )


def _wrap_encoder(args: argparse.Namespace) -> int:
    from jobbert_onnx.export.trained_model import wrap_trained_encoder

    folder = wrap_trained_encoder(args.source, args.output_dir, layout=args.layout, seed=args.seed)
    print(
        f"wrote JobBERT-v3's layout ({args.layout}) around the trained encoder of {args.source} to {folder}; "
        "its heads are RANDOM, so its vectors carry the encoder's numerics, not JobBERT's meaning",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from jobbert_onnx.batch.embed import BAD_ROW_POLICIES, OUTPUT_DTYPES, EmbedJob
    from jobbert_onnx.batch.match import MATCH_BAD_ROW_POLICIES, run_match
    from jobbert_onnx.export.random_model import LAYOUTS, SIZES, build_random_model
    from jobbert_onnx.export.trained_model import wrap_trained_encoder
    from jobbert_onnx.serve.config import API_KEY_ENV, BATCH_LIMITS, ServeConfig

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
        "--merged",
        action="store_true",
        help="also write the fp16 encoder, pooling and heads as one graph: one run per batch, CUDA's default "
        "where it exists (about the fp16 encoder's size again on disk)",
    )
    export.add_argument(
        "--packed",
        action="store_true",
        help="also write the fp16 encoder without padding inside (RemovePadding, PackedAttention: CUDA only), "
        "run with Tuning(packed=True)",
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
    _model_options(encode)
    encode.add_argument("texts", nargs="*", help="texts to encode; read from stdin, one per line, if none")
    encode.add_argument("--task", default=None, help="anchor (job titles) or positive (skill lists); default: anchor")
    encode.add_argument("--normalize", action="store_true", help="unit-length vectors")
    encode.add_argument("--progress", action="store_true", help="progress bar on stderr")
    encode.add_argument("-o", "--output", type=Path, help="write .npy or .jsonl here instead of JSON lines on stdout")
    encode.set_defaults(run=_encode)

    job = _defaults(EmbedJob)
    embed = commands.add_parser(
        "embed", help="embed a file of texts (.txt/.csv/.tsv/.jsonl/.parquet) into .parquet or .npy, resumably"
    )
    _model_options(embed)
    embed.add_argument("input", type=Path)
    embed.add_argument("output", type=Path, help=".parquet (id, text, embedding) or .npy (+ .ids.jsonl)")
    embed.add_argument("--task", required=True, help="anchor (job titles) or positive (skill lists)")
    embed.add_argument("--column", help="text column (default: the only column, or 'text')")
    embed.add_argument("--id-column", help="column kept as the row id (default: the row number)")
    embed.add_argument("--dtype", choices=OUTPUT_DTYPES, default=job["dtype"])
    embed.add_argument("--on-bad-row", choices=BAD_ROW_POLICIES, default=job["on_bad_row"])
    embed.add_argument("--resume", action="store_true", help="continue an interrupted run of the same job")
    embed.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    embed.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    embed.add_argument("--chunk-rows", type=int, default=job["chunk_rows"], help="rows per part (the unit of resuming)")
    embed.add_argument(
        "--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
        help="encode on a Ray cluster (ADDRESS, e.g. ray://head:10001; none: a local instance)",
    )  # fmt: skip
    embed.set_defaults(run=_embed)

    matching = _defaults(run_match)
    match = commands.add_parser("match", help="match job titles to the top-k concepts of a taxonomy (e.g. ESCO)")
    _model_options(match)
    match.add_argument("queries", type=Path, help="titles: .txt/.csv/.tsv/.jsonl/.parquet")
    match.add_argument("taxonomy", type=Path, help="CSV/TSV of concepts: id, label, optional |-joined alternatives")
    match.add_argument("output", type=Path, help=".csv (a row per query and rank) or .jsonl (a line per query)")
    match.add_argument("--top-k", type=int, default=matching["top_k"])
    match.add_argument("--column", help="query text column")
    match.add_argument("--id-column", help="query id column (default: the row number)")
    match.add_argument("--concept-id-column", default=matching["concept_id_column"])
    match.add_argument("--label-column", default=matching["label_column"])
    match.add_argument("--alt-column", default=matching["alt_column"], help="|-joined alternative labels ('' for none)")
    match.add_argument("--on-bad-row", choices=MATCH_BAD_ROW_POLICIES, default=matching["on_bad_row"])
    match.add_argument("--quiet", action="store_true")
    match.set_defaults(run=_match)

    config = _defaults(ServeConfig)
    serve = commands.add_parser(
        "serve", help="serve POST /v1/embeddings (OpenAI-compatible) with dynamic batching (needs jobbert-onnx[serve])"
    )
    _model_options(
        serve, batch_size=False, device_help="auto, cpu, cuda, cuda:N, or a list (cuda:0,cuda:1): one group each"
    )
    serve.add_argument("--host", default=config["host"], help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=config["port"], help="TCP port (0: any free one)")
    serve.add_argument("--workers", type=int, default=config["workers"], help="processes per device, sharing the port")
    serve.add_argument("--threads", type=int, help="onnxruntime threads per graph (default: cores / workers)")
    serve.add_argument("--served-model-name", default=config["served_model_name"], help="the 'model' clients send")
    serve.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    limits = {
        "max_batch_texts": (int, "texts per device batch"),
        "max_batch_tokens": (int, "tokens per device batch"),
        "max_wait_ms": (float, "how long a batch waits for more requests"),
        "max_inputs": (int, "texts per request"),
        "max_chars": (int, "longer texts are cut to this many characters before tokenizing"),
        "max_body_bytes": (int, "larger bodies get 413"),
        "max_queue_texts": (int, "beyond this many queued texts: 503"),
        "body_timeout_s": (float, "slower request bodies get 408"),
        "cache_size": (int, "vectors kept in an LRU cache of texts seen before, per task; 0: no cache"),
    }
    for name, (kind, text) in limits.items():
        default = config[name]
        if default is None:  # the device's (ServeConfig.batch_limits)
            cpu, cuda = (BATCH_LIMITS[device][name == "max_batch_tokens"] for device in ("cpu", "cuda"))
            shown = f"{cpu} on the CPU, {cuda} on CUDA"
        else:
            shown = str(default)
        serve.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=f"{text} ({shown})")
    serve.add_argument("--log-texts", action="store_true", help="log request texts (off by default)")
    serve.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the model files")
    serve.set_defaults(run=_serve)

    model = _defaults(build_random_model)
    random_model = commands.add_parser(
        "random-model", help="write a JobBERT-v3-shaped model with random weights (for offline tests and benchmarks)"
    )
    random_model.add_argument("output_dir", type=Path)
    random_model.add_argument("--size", choices=SIZES, default=model["size"], help=f"default: {model['size']}")
    random_model.add_argument("--layout", choices=LAYOUTS, default=model["layout"])
    random_model.add_argument("--seed", type=int, default=model["seed"])
    random_model.add_argument(
        "--outliers",
        action="store_true",
        help="give the encoder the outlier dimensions of trained models (to prove low-precision variants on)",
    )
    random_model.set_defaults(run=_random_model)

    wrapped = _defaults(wrap_trained_encoder)
    wrap = commands.add_parser(
        "wrap-encoder",
        help="put a trained mean-pooling sentence encoder into JobBERT-v3's layout with seeded heads "
        "(real weights to prove precision on, offline)",
    )
    wrap.add_argument("source", type=Path, help="a sentence-transformers folder: Transformer -> Pooling (mean)")
    wrap.add_argument("output_dir", type=Path)
    wrap.add_argument("--layout", choices=LAYOUTS, default=wrapped["layout"])
    wrap.add_argument("--seed", type=int, default=wrapped["seed"])
    wrap.set_defaults(run=_wrap_encoder)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `jobbert-onnx` command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except JobbertOnnxError as error:
        print(f"jobbert-onnx {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"jobbert-onnx {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
