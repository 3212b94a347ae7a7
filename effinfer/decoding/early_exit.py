"""Early exit (CALM, Schuster et al. 2022; LayerSkip): a decoding token may leave the model after an
intermediate layer when a confidence test says the rest of the layers would not change its prediction.

An exit head sits after each chosen layer: a zero-initialised linear adapter and a norm in front of the
model's own output head (shared, frozen), taught by distillation to predict the final layer's
distribution (`effinfer exit-heads`, tools/distill.py), plus a one-unit classifier trained to
predict whether the head's argmax agrees with the full model's. The exit test is that classifier, not
the head's softmax: SmolLM2's 49k-way head weighs as much as eight of its layers, so evaluating it at
every exit point would cost more than exiting saves. The head runs only in steps that exit, in place of
the final one.

A token that exits skips the remaining layers, but later tokens attend to its K/V in every layer. They
are filled by CALM's state propagation: each skipped layer projects K/V from the exit hidden state (its
input norm, K/V projection and rotary; no attention, no MLP). Early exit is therefore lossy; its quality
is measured against the full model (benchmarks/README.md, "Early exit").

Only single-token decode rows exit, and a step exits only when all its sequences may (see `forward`);
prompt chunks, verification rows and prompt-logprob rows run every layer. A request's K/V past its
prompt can be approximate, so those blocks are kept out of the prefix cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

FORMAT = "effinfer-exit-heads-v1"


class ExitHead(nn.Module):
    """features = norm(h + adapter(h)); logits = the model's head(features); confidence = sigmoid(w . features + b)."""

    def __init__(self, final_norm: nn.Module, hidden_size: int):
        super().__init__()
        self.adapter = nn.Linear(hidden_size, hidden_size, bias=False)
        nn.init.zeros_(self.adapter.weight)   # starts as the "logit lens": the final norm and head on h
        self.norm = _copy_module(final_norm)
        self.classifier = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden + self.adapter(hidden))

    def confidence(self, features: torch.Tensor) -> torch.Tensor:
        """[tokens] probability that this head's argmax equals the full model's (fp32)."""
        return torch.sigmoid(self.classifier(features).float().squeeze(-1))


class ExitHeads(nn.Module):
    def __init__(self, layers: list[int], final_norm: nn.Module, hidden_size: int):
        super().__init__()
        self.layers = sorted(layers)
        self.heads = nn.ModuleDict({str(i): ExitHead(final_norm, hidden_size) for i in self.layers})

    def __getitem__(self, layer: int) -> ExitHead:
        return self.heads[str(layer)]

    def save(self, path: str | Path, base_model: str, num_layers: int, report: dict | None = None) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().float().contiguous() for name, t in self.state_dict().items()}
        meta = {"format": FORMAT, "base_model": base_model, "exit_layers": json.dumps(self.layers),
                "num_layers": str(num_layers), "hidden_size": str(self.heads[str(self.layers[0])].adapter.in_features),
                "report": json.dumps(report or {})}
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, model: nn.Module) -> "ExitHeads":
        """Heads from `effinfer exit-heads`, checked against `model` (depth and width), in its dtype and device."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"exit heads file {str(path)!r} does not exist (train one with `effinfer exit-heads`)")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path))
        except Exception as exc:   # a truncated or foreign file: one clear line, not a traceback
            raise ValueError(f"{path} is not a readable exit-heads file: {exc}") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an exit-heads file (format {meta.get('format')!r}, expected {FORMAT!r})")
        cfg = model.config
        if int(meta["num_layers"]) != cfg.num_layers or int(meta["hidden_size"]) != cfg.hidden_size:
            raise ValueError(f"{path} was trained for a model of {meta['num_layers']} layers of width "
                             f"{meta['hidden_size']} ({meta.get('base_model')}); this model has {cfg.num_layers} "
                             f"layers of width {cfg.hidden_size}")
        heads = cls(json.loads(meta["exit_layers"]), model.model.norm, cfg.hidden_size)
        heads.load_state_dict(state)
        like = model.model.norm.weight         # the activation dtype, whatever format the linear layers use
        return heads.to(device=like.device, dtype=like.dtype).requires_grad_(False).eval()


def parse_exit_layers(spec: str | None, num_layers: int) -> list[int]:
    """"10,20" -> [10, 20]; default: after the layers at one half and three quarters of the depth.
    The last layer is not an exit point (its head is the model's own)."""
    if not spec:
        return sorted({num_layers // 2 - 1, (3 * num_layers) // 4 - 1})
    try:
        layers = sorted({int(x) for x in spec.split(",")})
    except ValueError:
        raise ValueError(f"exit layers {spec!r}: expected layer indices like 14,21") from None
    if layers[0] < 0 or layers[-1] >= num_layers - 1:
        raise ValueError(f"exit layers {spec!r}: exits go after layers 0-{num_layers - 2} of this {num_layers}-layer model")
    return layers


class EarlyExit:
    """Runs a step's forward with exits; counts the decode tokens that could exit and, per exit layer, those
    that did."""

    def __init__(self, model: nn.Module, heads: ExitHeads):
        self.model, self.heads = model, heads
        self.stats = {"candidates": 0, "exited": 0, "by_layer": {layer: 0 for layer in heads.layers}}

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta, seqs, logit_rows: torch.Tensor) -> torch.Tensor:
        """Like `model(...)` then `compute_logits(hidden[logit_rows])`, except that the whole step leaves after
        an exit layer when every sequence in it is a decode token whose head is confident enough.

        The exit is all or nothing for the step's batch: a batch runs each layer once for all its rows, so
        letting some rows leave saves nothing unless all do (measured: per-token exits with the batch shrunk
        in place were 6-19% slower than no exit at 8 concurrent requests)."""
        thresholds = [seq.exit_threshold for seq in seqs]
        self.stats["candidates"] += sum(t is not None for t in thresholds)
        if not all(t is not None for t in thresholds):
            return self.model.compute_logits(self.model(input_ids, positions, meta)[logit_rows])
        limits = torch.tensor(thresholds, device=input_ids.device)
        exit_features = []

        def after_layer(index: int, hidden: torch.Tensor, ropes: list[tuple]) -> bool:
            if str(index) not in self.heads.heads:
                return False
            features = self.heads[index].features(hidden)      # decode steps: row i is sequence i
            if not bool((self.heads[index].confidence(features) > limits).all()):
                return False
            self._fill_skipped_kv(hidden, ropes, meta.slot_mapping, index + 1)
            self.stats["exited"] += len(seqs)
            self.stats["by_layer"][index] += len(seqs)
            exit_features.append(features)
            return True

        hidden = self.model(input_ids, positions, meta, after_layer=after_layer)
        if exit_features:
            return self.model.compute_logits(exit_features[0])
        return self.model.compute_logits(hidden[logit_rows])

    def _fill_skipped_kv(self, hidden: torch.Tensor, ropes: list[tuple], slots: torch.Tensor, first: int) -> None:
        """K/V of the exited tokens in layers `first`.. from their exit hidden state (state propagation)."""
        for index in range(first, len(self.model.model.layers)):
            self.model.model.layers[index].write_kv(hidden, ropes[index], slots)


def _copy_module(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module).float().requires_grad_(True)
