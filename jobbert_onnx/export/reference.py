"""The PyTorch reference the export is checked against.

transformers' own XLM-R model and fast tokenizer, loaded from the source folder
as sentence-transformers loads them, then mean pooling and the Dense + Tanh
heads (L2-normalized where the model has a Normalize module), all in fp32 on the CPU.
"""

from __future__ import annotations

import numpy as np

from jobbert_onnx.export.hf import load_encoder, load_tokenizer
from jobbert_onnx.export.source import ModelSpec, load_state


class TorchReference:
    """sentence-transformers' computation for JobBERT-v3, without sentence-transformers."""

    def __init__(self, spec: ModelSpec) -> None:
        import torch

        self._torch = torch
        self.spec = spec
        self.model = load_encoder(spec)
        self.tokenizer = load_tokenizer(spec)
        self.heads = {}
        for route, head in spec.heads.items():
            state = load_state(head.weights)
            weight, bias = (torch.from_numpy(state[name]).float() for name in ("linear.weight", "linear.bias"))
            self.heads[route] = (weight, bias)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Ids as sentence-transformers feeds them: stripped (as up to 5.3), truncated to max_seq_length,
        unpadded."""
        stripped = [text.strip() for text in texts]
        encoded = self.tokenizer(stripped, truncation="longest_first", max_length=self.spec.max_seq_length)
        return [list(ids) for ids in encoded["input_ids"]]

    def encode(self, texts: list[str], route: str, batch_size: int = 16) -> np.ndarray:
        """float32 vectors [n, dim] for one head."""
        return self.encode_heads(texts, (route,), batch_size)[route]

    def encode_heads(
        self, texts: list[str], routes: tuple[str, ...] | None = None, batch_size: int = 16
    ) -> dict[str, np.ndarray]:
        """float32 vectors [n, dim] for each head in `routes` (default: all), the encoder run once."""
        torch = self._torch
        chosen = tuple(self.heads) if routes is None else routes
        out: dict[str, list[np.ndarray]] = {route: [] for route in chosen}
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                chunk = [text.strip() for text in texts[start : start + batch_size]]
                enc = self.tokenizer(
                    chunk,
                    padding=True,
                    truncation="longest_first",
                    max_length=self.spec.max_seq_length,
                    return_tensors="pt",
                )
                hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                for route in chosen:
                    weight, bias = self.heads[route]
                    vectors = torch.tanh(pooled @ weight.T + bias)
                    if self.spec.heads[route].normalize:
                        vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)
                    out[route].append(vectors.numpy())
        return {route: np.concatenate(vectors).astype(np.float32) for route, vectors in out.items()}
