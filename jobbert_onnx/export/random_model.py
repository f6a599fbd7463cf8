"""Build JobBERT-v3-shaped models with random weights, in either on-disk layout.

The real weights cannot be downloaded offline. These models have the exact
architecture (full size: XLM-R base, 12 layers, hidden 768, vocab 250,002, two
Dense(768 -> 1024) + Tanh heads) or a tiny one for fast tests, the same files,
folder names and configuration keys as the hub repository, and the genuine
XLM-R tokenizer (`xlmr_tokenizer`), so token counts are the real model's. Their
vectors carry no meaning: use them to test wiring, parity and speed, never
accuracy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from jobbert_onnx._files import write_json
from jobbert_onnx.errors import UsageError

LAYOUTS = ("router", "legacy-asym")
SIZES = ("tiny", "full")
_DENSE_TYPE = {
    "router": "sentence_transformers.models.Dense.Dense",
    "legacy-asym": "sentence_transformers.models.Dense",
}
# Folder names of the two heads as the hub repository has them.
_HEAD_FOLDERS = {
    "router": {"anchor": "anchor_0_Dense", "positive": "positive_0_Dense"},
    "legacy-asym": {"anchor": "6235903824_Dense", "positive": "6235904160_Dense"},
}
_ENCODER: dict[str, dict[str, Any]] = {
    "full": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64},
}
OUTPUT_DIM = 1024
MAX_SEQ_LENGTH = 64

# Trained BERT-family encoders, XLM-R included, carry a few outlier hidden dimensions
# (Kovaleva et al. 2021, "BERT Busters: Outlier Dimensions that Disrupt Transformers";
# Bondarenko et al. 2021, "Understanding and Overcoming the Challenges of Efficient
# Transformer Quantization"): LayerNorm gains several times the others in one to three
# dimensions, large values there for every token, and, in late layers, feed-forward outputs
# of hundreds in those dimensions for delimiter tokens (the separator, commas, full stops),
# which attention learns to use as a no-op. Gaussian random weights have none.
# `outliers=True` writes that mechanism in:
OUTLIER_DIMS = 2  # how many hidden dimensions (chosen by the seed)
OUTLIER_LN_GAIN = 3.0  # every LayerNorm's gain in those dimensions (1.0 elsewhere)
DELIMITERS = (2, 4, 5)  # </s>, "," and "." in XLM-R's vocabulary
OUTLIER_MARKER = 10.0  # the delimiters' word embeddings in those dimensions, all positive
# Every other token's word embedding there: this size, with a sign per token and dimension,
# never all positive. The gain makes each LayerNorm grow these dimensions until they hold most of the
# variance, so every token carries |value| ~ `outlier_level` there, with its embedding's
# signs. Drawn from the Gaussian init instead, a sign near zero is a coin toss that a 1%
# change of any weight can flip (the whole token vector with it), which no trained model
# shows (Bondarenko et al.: 8-bit weights alone keep BERT's accuracy); this keeps every
# sign decided, and the position and token-type embeddings stay out of them.
OUTLIER_SEED = 0.05
OUTLIER_LATE_LAYERS = 1 / 3  # the share of layers, from the top, with the feed-forward circuit below
OUTLIER_UNITS = 16  # feed-forward units per such layer reading the sum of those dimensions ...
# ... less `outlier_level`: delimiters (all signs positive) fire at about +level, every
# other token sits at -level or below, so no token is near the switch ...
OUTLIER_OUT_WEIGHT = 2.0  # ... and write back into them: outputs in the hundreds for delimiters
# Mean pooling carries the delimiters' outlier dimensions into the heads ("rogue dimensions":
# Timkey & van Schijndel 2021, "All Bark and No Bite"); trained heads read them weakly, or
# every text would get nearly the same vector. The heads' weights there:
OUTLIER_HEAD_SCALE = 1 / 200
# Trained encoders also single out tokens, not only dimensions (measured on a trained BERT-family
# sentence encoder): the first token (``<s>``) carries, in early layers, feed-forward outputs
# about 180 times the median channel and LayerNorm outputs about 16 times, and padded positions
# (which attend to the text but are never pooled) reach several times the real tokens' largest
# LayerNorm output and tens of times their GELU outputs. Anything that shares one quantization
# scale between tokens, or between a text and its padding, breaks on these. `outliers=True`
# writes them in too:
FIRST_TOKEN = 0  # <s>
FIRST_DIMS = 2  # hidden dimensions that mark the first token (chosen by the seed, apart from the others)
FIRST_MARKER = 10.0  # <s>'s word embedding there (every other token: 0)
FIRST_EARLY_LAYERS = 1 / 3  # the share of layers, from the bottom, whose feed-forward fires on <s>:
FIRST_UNITS = 8  # units reading the sum of those dimensions less a quarter of <s>'s value there after
# the embeddings' LayerNorm (`token_level`; no other token has any) ...
FIRST_OUT_WEIGHT = 2.0  # ... and writing back into them
PAD_TOKEN = 1  # <pad>
PAD_MARKER = 1.0  # <pad>'s word embedding in one dimension of its own (every other token: 0)
# The embeddings' LayerNorm gain there: padded positions leave it at about sqrt(hidden) x 10. Only
# that LayerNorm, or every token would grow the dimension layer by layer; nothing else writes into it.
PAD_LN_GAIN = 10.0
PAD_UNITS = 8  # feed-forward units per layer that read it less half of a padded position's value there ...
PAD_UNIT_WEIGHT = 20.0  # ... this strongly (padded positions fire; no real token does) ...
PAD_WRITE = 0.1  # ... and write back into it this weakly, so padded positions keep it through the layers


def outlier_level(hidden: int) -> float:
    """The |value| every token's outlier dimensions settle at after a LayerNorm.

    Where those dimensions hold nearly all the variance, LayerNorm divides by a standard
    deviation equal to its gain there, which holds `OUTLIER_DIMS` values of size ``v``:
    ``OUTLIER_DIMS * v**2 / hidden = gain**2 - 1`` (the other dimensions hold variance 1).
    """
    return math.sqrt(hidden * (OUTLIER_LN_GAIN**2 - 1) / OUTLIER_DIMS)


_SPECIAL = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
_TOKENIZER_CONFIG: dict[str, Any] = {
    "added_tokens_decoder": {
        "0": {"content": "<s>", **_SPECIAL},
        "1": {"content": "<pad>", **_SPECIAL},
        "2": {"content": "</s>", **_SPECIAL},
        "3": {"content": "<unk>", **_SPECIAL},
        "250001": {"content": "<mask>", **_SPECIAL, "lstrip": True},
    },
    "bos_token": "<s>",
    "clean_up_tokenization_spaces": False,
    "cls_token": "<s>",
    "eos_token": "</s>",
    "extra_special_tokens": {},
    "mask_token": "<mask>",
    "max_length": 128,
    "model_max_length": MAX_SEQ_LENGTH,
    "pad_to_multiple_of": None,
    "pad_token": "<pad>",
    "pad_token_type_id": 0,
    "padding_side": "right",
    "sep_token": "</s>",
    "stride": 0,
    "tokenizer_class": "XLMRobertaTokenizerFast",
    "truncation_side": "right",
    "truncation_strategy": "longest_first",
    "unk_token": "<unk>",
}
_POOLING = {
    "word_embedding_dimension": None,
    "pooling_mode_cls_token": False,
    "pooling_mode_mean_tokens": True,
    "pooling_mode_max_tokens": False,
    "pooling_mode_mean_sqrt_len_tokens": False,
    "pooling_mode_weightedmean_tokens": False,
    "pooling_mode_lasttoken": False,
    "include_prompt": True,
}


def _add_outliers(encoder: Any, generator: Any) -> list[int]:
    """Give `encoder` outlier dimensions in place (see `OUTLIER_DIMS`); returns them."""
    import torch

    hidden = encoder.config.hidden_size
    dims = torch.randperm(hidden, generator=generator)[:OUTLIER_DIMS]
    layers = encoder.encoder.layer
    late = max(1, round(len(layers) * OUTLIER_LATE_LAYERS))
    with torch.no_grad():
        norms = [encoder.embeddings.LayerNorm]
        norms += [n for layer in layers for n in (layer.attention.output.LayerNorm, layer.output.LayerNorm)]
        for norm in norms:
            norm.weight[dims] = OUTLIER_LN_GAIN
        words = encoder.embeddings.word_embeddings.weight
        signs = torch.randint(0, 2, (words.shape[0], OUTLIER_DIMS), generator=generator) * 2.0 - 1.0
        all_positive = (signs > 0).all(dim=1).nonzero().flatten()
        flip = torch.randint(0, OUTLIER_DIMS, (len(all_positive),), generator=generator)
        signs[all_positive, flip] = -1.0
        words[:, dims] = signs * OUTLIER_SEED
        for token in DELIMITERS:
            words[token, dims] = OUTLIER_MARKER
        encoder.embeddings.position_embeddings.weight[:, dims] = 0.0
        encoder.embeddings.token_type_embeddings.weight[:, dims] = 0.0
        inner = encoder.config.intermediate_size
        for layer in layers[-late:]:
            units = torch.randperm(inner, generator=generator)[: min(OUTLIER_UNITS, inner)]
            up, down = layer.intermediate.dense, layer.output.dense
            up.weight[units] = 0.0
            up.weight[units[:, None], dims[None, :]] = 1.0
            up.bias[units] = -outlier_level(hidden)
            down.weight[dims[:, None], units[None, :]] = OUTLIER_OUT_WEIGHT
    return [int(d) for d in dims]


def token_level(hidden: int, dims: int) -> float:
    """A token's value in each of `dims` dimensions that hold nearly all its variance, after a LayerNorm."""
    return math.sqrt(hidden / dims)


def _add_token_outliers(encoder: Any, generator: Any, taken: list[int]) -> list[int]:
    """Give the first token and padded positions their trained-model outliers in place (`FIRST_TOKEN`,
    `PAD_TOKEN`); returns the first token's dimensions (the heads read them weakly)."""
    import torch

    hidden = encoder.config.hidden_size
    free = torch.tensor([d for d in torch.randperm(hidden, generator=generator).tolist() if d not in taken])
    first, pad = free[:FIRST_DIMS], int(free[FIRST_DIMS])
    layers = encoder.encoder.layer
    inner = encoder.config.intermediate_size
    embeddings = encoder.embeddings
    with torch.no_grad():
        words = embeddings.word_embeddings.weight
        words[:, first] = 0.0
        words[FIRST_TOKEN, first] = FIRST_MARKER
        # Its marker takes the outlier dimensions' share of <s>'s variance, which would leave their values
        # to whatever attention brings (measured: a fifth of the texts' <s> within 10 of the delimiters'
        # switch, and int8 min cosine 0.89 from it): mark them far below it.
        words[FIRST_TOKEN, taken] = -OUTLIER_MARKER
        words[:, pad] = 0.0
        words[PAD_TOKEN, pad] = PAD_MARKER
        for table in (embeddings.position_embeddings.weight, embeddings.token_type_embeddings.weight):
            table[:, first] = 0.0
            table[:, pad] = 0.0
        embeddings.LayerNorm.weight[pad] = PAD_LN_GAIN
        embeddings.LayerNorm.bias[pad] = 0.0
        for index, layer in enumerate(layers):
            # Nothing but the padding units writes into the padding dimension, so only padded positions carry it.
            layer.attention.output.dense.weight[pad] = 0.0
            layer.attention.output.dense.bias[pad] = 0.0
            up, down = layer.intermediate.dense, layer.output.dense
            down.weight[pad] = 0.0
            down.bias[pad] = 0.0
            units = torch.randperm(inner, generator=generator)[: min(FIRST_UNITS + PAD_UNITS, inner)]
            pad_units, first_units = units[:PAD_UNITS], units[PAD_UNITS:]
            up.weight[pad_units] = 0.0
            up.weight[pad_units, pad] = PAD_UNIT_WEIGHT
            up.bias[pad_units] = -PAD_UNIT_WEIGHT * token_level(hidden, 1) / 2
            down.weight[:, pad_units] = 0.0
            down.weight[pad, pad_units] = PAD_WRITE
            if index < max(1, round(len(layers) * FIRST_EARLY_LAYERS)):
                up.weight[first_units] = 0.0
                up.weight[first_units[:, None], first[None, :]] = 1.0
                up.bias[first_units] = -FIRST_DIMS * token_level(hidden, FIRST_DIMS + OUTLIER_DIMS) / 4
                down.weight[first[:, None], first_units[None, :]] = FIRST_OUT_WEIGHT
    return [int(d) for d in first]


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data)


def build_random_model(
    folder: str | Path, size: str = "tiny", layout: str = "router", seed: int = 0, outliers: bool = False
) -> Path:
    """Write a random-weight JobBERT-v3-shaped sentence-transformers folder.

    Args:
        folder: Where to write; created if needed.
        size: ``"full"`` for the real architecture, ``"tiny"`` for fast tests.
        layout: ``"router"`` (current hub revision, ``2_Router``) or
            ``"legacy-asym"`` (sentence-transformers 4.x, ``2_Asym``).
        seed: Seed for the weights; the same seed gives the same model.
        outliers: Give the encoder the outlier dimensions of trained models (see
            `OUTLIER_DIMS`), which is what low-precision variants must be proven on.

    Returns:
        The folder.
    """
    if size not in SIZES:
        raise UsageError(f"unknown size {size!r}; choose one of: {', '.join(SIZES)}")
    if layout not in LAYOUTS:
        raise UsageError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from jobbert_onnx.export.xlmr_tokenizer import VOCAB_SIZE, xlmr_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = XLMRobertaConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=514,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        hidden_act="gelu",
        initializer_range=0.02,
        architectures=["XLMRobertaModel"],
        **_ENCODER[size],
    )
    encoder = XLMRobertaModel(config).eval()
    dims: list[int] = []
    if outliers:
        generator = torch.Generator().manual_seed(seed)
        dims = _add_outliers(encoder, generator)
        dims += _add_token_outliers(encoder, generator, dims)
    encoder.save_pretrained(folder, safe_serialization=True)
    hidden = config.hidden_size

    tokenizer = xlmr_tokenizer()
    # The hub's tokenizer.json stores a truncation of 128: keep that trap (the model's cap is 64).
    tokenizer.enable_truncation(max_length=_TOKENIZER_CONFIG["max_length"])
    tokenizer.save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", _TOKENIZER_CONFIG)
    write_layout(folder, hidden, layout, weak_dims=dims)
    return folder


def write_layout(
    folder: Path, hidden: int, layout: str, weak_dims: list[int] | None = None, do_lower_case: bool = False
) -> None:
    """Write everything of JobBERT-v3's folder but the encoder: its sentence-transformers
    configuration, mean pooling and the two Dense(hidden -> 1024) + Tanh heads.

    The heads take torch's default initialisation from the seed already set; `weak_dims`
    are the hidden dimensions they read 200 times more weakly (`OUTLIER_HEAD_SCALE`).
    """
    import torch
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise UsageError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    dims = weak_dims or []
    _write_json(
        folder / "sentence_bert_config.json", {"max_seq_length": MAX_SEQ_LENGTH, "do_lower_case": do_lower_case}
    )
    _write_json(folder / "1_Pooling" / "config.json", {**_POOLING, "word_embedding_dimension": hidden})
    module_folder = "2_Router" if layout == "router" else "2_Asym"
    heads = _HEAD_FOLDERS[layout]
    for name in heads.values():
        linear = torch.nn.Linear(hidden, OUTPUT_DIM)
        with torch.no_grad():
            linear.weight[:, dims] *= OUTLIER_HEAD_SCALE
        head_folder = folder / module_folder / name
        _write_json(
            head_folder / "config.json",
            {
                "in_features": hidden,
                "out_features": OUTPUT_DIM,
                "bias": True,
                "activation_function": "torch.nn.modules.activation.Tanh",
            },
        )
        state = {"linear.weight": linear.weight.detach().contiguous(), "linear.bias": linear.bias.detach().contiguous()}
        save_file(state, str(head_folder / "model.safetensors"))
    router: dict[str, Any] = {
        "types": {name: _DENSE_TYPE[layout] for name in heads.values()},
        "structure": {route: [name] for route, name in heads.items()},
        "parameters": {"default_route": "anchor", "allow_empty_key": True}
        if layout == "router"
        else {"allow_empty_key": True},
    }
    if layout == "router":
        _write_json(folder / module_folder / "router_config.json", router)
        _write_json(
            folder / "config_sentence_transformers.json",
            {
                "__version__": {"sentence_transformers": "5.1.0", "transformers": "4.56.1", "pytorch": "2.8.0"},
                "prompts": {"query": "", "document": ""},
                "default_prompt_name": None,
                "similarity_fn_name": "cosine",
                "model_type": "SentenceTransformer",
            },
        )
        router_type = "sentence_transformers.models.Router"
    else:
        _write_json(folder / module_folder / "config.json", router)
        router_type = "sentence_transformers.models.Asym"
    _write_json(
        folder / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": module_folder, "type": router_type},
        ],
    )
