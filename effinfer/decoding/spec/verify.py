"""Verification of draft tokens by speculative sampling (Leviathan et al., 2023; Chen et al., 2023).

With target distributions p_0..p_k (after every sampling setting: penalties, temperature, top-k/p,
min-p) at the k draft positions and one beyond, and a proposer whose draft d_j had probability q_j(d_j):
accept d_j with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection, emit a token from the
residual max(p_j - q_j, 0) (normalised) and stop; if every draft is accepted, emit a bonus token from
p_k. Emitted tokens then follow p exactly. Deterministic proposers (n-gram) have q_j = one-hot(d_j), so
acceptance is p_j(d_j) and the residual is p_j without d_j. Greedy rows have one-hot p, which makes this
exact prefix matching against the argmax.
"""

from __future__ import annotations

import torch


def verify(probs: torch.Tensor, drafts: list[int], generator: torch.Generator,
           draft_probs: torch.Tensor | None = None) -> list[int]:
    """probs [k + 1, vocab]; drafts [k]; draft_probs [k, vocab] or None (one-hot drafts).
    Returns the emitted tokens: the accepted drafts, then one corrected or bonus token."""
    out = []
    for j, token in enumerate(drafts):
        p = probs[j]
        q = draft_probs[j] if draft_probs is not None else None
        accept_prob = float(p[token]) if q is None else min(1.0, float(p[token] / q[token].clamp(min=1e-20)))
        if accept_prob >= 1.0 or _uniform(generator, p.device) < accept_prob:
            out.append(token)
            continue
        if q is None:
            residual = p.clone()
            residual[token] = 0
        else:
            residual = (p - q).clamp(min=0)
        out.append(_sample(residual if float(residual.sum()) > 0 else p, generator))
        return out
    out.append(_sample(probs[len(drafts)], generator))
    return out


def _uniform(generator: torch.Generator, device) -> float:
    return float(torch.rand((), generator=generator, device=device))


def _sample(weights: torch.Tensor, generator: torch.Generator) -> int:
    # exponential race, as the sampler: argmax(w / E), E ~ Exp(1); exact argmax for one-hot weights
    noise = torch.empty_like(weights).exponential_(generator=generator)
    return int((weights / noise).argmax())
