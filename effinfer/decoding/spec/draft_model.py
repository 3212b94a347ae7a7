"""Model drafters: a smaller model with the target's tokenizer (Leviathan et al., 2023; vLLM's draft model),
or the target itself with layers skipped (self-speculation: Draft & Verify, Zhang et al., 2024; LayerSkip).

The draft runs greedily with its own paged KV cache (`SideModel`, given by the engine): each step it
catches up on the tokens the target accepted since its last call (rejected drafts roll back by prefix
match), then makes its k drafts one token per forward, all requests of the step packed together.
Greedy drafts are deterministic, so verification treats them as one-hot proposals: lossless for
greedy and sampled requests alike.
"""

from __future__ import annotations

import torch
from torch import nn

from effinfer.decoding.spec import DraftRequest, Proposer

TOKENIZER_PROBE = "def main():\n    print('Hello, world!')  # café, 東京, 123456\n"


class DraftModelProposer(Proposer):
    name = "draft_model"
    required_options = {"speculative_model": "the draft model to load"}

    def __init__(self, side_model, vocab_size: int):
        self.side = side_model
        """A `SideModel`: the draft network, its KV pages and per-request state."""
        self.vocab_size = vocab_size
        """The target's: a draft with a larger (padded) vocabulary may not propose ids past it."""

    @classmethod
    def from_config(cls, spec_config, context) -> "DraftModelProposer":
        from effinfer.loader.source import load_tokenizer

        name = spec_config.speculative_model
        check_same_tokenizer(load_tokenizer(name, context.cache_dir), context.tokenizer, name)
        loaded = context.load_model(name, spec_config.speculative_model_quantization)
        return cls(context.side_model(loaded.model, spec_config.speculative_draft_memory_gb,
                                      loaded.config.max_position_embeddings), context.vocab_size)

    def propose_batch(self, batch: list[DraftRequest]) -> list[list[int]]:
        drafts: dict[str, list[int]] = {r.request_id: [] for r in batch}
        active = [r for r in batch if r.num_tokens > 0]
        while active:
            rows = self.side.extend([(r.request_id, r.token_ids + drafts[r.request_id]) for r in active])
            still = []
            for request, logits in zip(active, rows):
                if logits is None:              # no room in the draft's cache: no drafts this step
                    continue
                draft = drafts[request.request_id]
                draft.append(int(logits[:self.vocab_size].argmax()))
                if len(draft) < request.num_tokens:
                    still.append(request)
            active = still
        return [drafts[r.request_id] for r in batch]

    def release(self, request_id: str) -> None:
        self.side.release(request_id)


class SelfDraftProposer(DraftModelProposer):
    name = "self"
    required_options = {}

    @classmethod
    def from_config(cls, spec_config, context) -> "SelfDraftProposer":
        num_layers = len(context.model.model.layers)
        keep = parse_layers(spec_config.speculative_draft_layers, num_layers) or default_draft_layers(num_layers)
        subset = LayerSubset(context.model, keep)
        return cls(context.side_model(subset, spec_config.speculative_draft_memory_gb), context.vocab_size)


class LayerSubset(nn.Module):
    """The target's network with only the `keep` decoder layers (the target's decoder loop, given `layer_ids`),
    sharing every weight (no copy). Its attention modules are the target's own; the side model's runner hands
    them its own pages in each step's metadata (`AttentionMetadata.kv_bindings`)."""

    def __init__(self, target: nn.Module, keep: list[int]):
        super().__init__()
        self.keep = keep
        self.layers = nn.ModuleList(target.model.layers[i] for i in keep)
        self._target = [target]   # in a list: not a registered submodule (its other layers are not ours)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        return self._target[0].forward(input_ids, positions, meta, layer_ids=self.keep)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._target[0].compute_logits(hidden)


def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """ "0-11,29" -> [0, ..., 11, 29]; checked against the model's layer count."""
    if not spec:
        return []
    layers = set()
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        try:
            layers.update(range(int(first), int(last or first) + 1))
        except ValueError:
            raise ValueError(f"speculative_draft_layers={spec!r}: expected indices and ranges like 0-11,29") from None
    if not layers or min(layers) < 0 or max(layers) >= num_layers:
        raise ValueError(f"speculative_draft_layers={spec!r}: the model has layers 0-{num_layers - 1}")
    if len(layers) == num_layers:
        raise ValueError("speculative_draft_layers keeps every layer: the draft would cost as much as the target")
    return sorted(layers)


def default_draft_layers(num_layers: int) -> list[int]:
    """Skip every other layer of the middle half: first and last layers matter most to the output
    (ShortGPT's block influence is lowest in the middle-to-late layers)."""
    quarter = num_layers // 4
    middle = range(quarter, num_layers - quarter)
    return [i for i in range(num_layers) if i not in middle or (i - quarter) % 2 == 0]


def check_same_tokenizer(draft, target, name: str) -> None:
    """Drafts are token ids: the two models must mean the same text by them."""
    if draft.encode(TOKENIZER_PROBE) != target.encode(TOKENIZER_PROBE):
        raise ValueError(f"the draft model {name!r} has a different tokenizer from the target's; "
                         "speculative decoding needs the same token ids")
