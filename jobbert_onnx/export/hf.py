"""Loading from transformers without its chatter."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from jobbert_onnx.export.source import ENCODER_TYPES, ModelSpec


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' load report and progress bars (the unused pooler weights are expected)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_encoder(spec: ModelSpec, attention: str | None = None) -> Any:
    """The source's encoder (XLM-R or BERT) as a transformers model in eval mode, without its pooler.

    Args:
        spec: The source model.
        attention: transformers' ``attn_implementation``; None keeps its default,
            as sentence-transformers does.
    """
    import transformers

    model_class = getattr(transformers, ENCODER_TYPES[spec.encoder_config["model_type"]])

    kwargs: dict[str, Any] = {"attn_implementation": attention} if attention else {}
    # Never let transformers fall back to pickle on its own: pickle only when read_model allowed it.
    kwargs["use_safetensors"] = spec.encoder_weights.suffix == ".safetensors"
    with quiet_transformers():
        model = model_class.from_pretrained(str(spec.encoder_folder), add_pooling_layer=False, **kwargs)
    return model.eval()


def load_tokenizer(spec: ModelSpec) -> Any:
    """transformers' tokenizer for the source folder, as sentence-transformers loads it."""
    from transformers import AutoTokenizer

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(str(spec.encoder_folder))
