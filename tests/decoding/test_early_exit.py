"""Early exit: heads learn the final layer, the engine's exits match a dense token-by-token reference that
fills the skipped layers' K/V from the exit state, and exits off is exactly the plain engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from effinfer import LLM, SamplingParams
from effinfer.tools.distill import ExitHeadsConfig, distill_exit_heads
from effinfer.decoding.early_exit import ExitHeads, parse_exit_layers
from effinfer.layers.rotary import apply_rotary
from effinfer.serving.metrics import ServerMetrics
from tests.tiny_models import save_tiny_folder

COMMON = dict(dtype="float32", show_progress=False, kv_cache_memory_gb=0.05)
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33, 34, 35]]


def random_heads(folder, layers: list[int], seed: int = 0):
    """Exit heads with random adapters and classifiers (confidence ~0.5 +- spread): some tokens exit, some not."""
    llm = LLM(str(folder), **COMMON)
    model = llm.engine.model
    torch.manual_seed(seed)
    heads = ExitHeads(layers, model.model.norm, model.config.hidden_size)
    with torch.no_grad():
        for layer in layers:
            heads[layer].adapter.weight.normal_(0, 0.05)
            heads[layer].classifier.weight.normal_(0, 0.05)
    return heads.save(folder.parent / f"{folder.name}-heads.safetensors", str(folder), model.config.num_layers)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny4")
    save_tiny_folder("llama", folder, num_layers=4)
    return folder, random_heads(folder, [1, 2])


def test_exit_layers_parse_and_default():
    assert parse_exit_layers(None, 30) == [14, 21]
    assert parse_exit_layers("21, 14", 30) == [14, 21]
    for bad in ("29", "-1", "a,b"):
        with pytest.raises(ValueError):
            parse_exit_layers(bad, 30)


def test_threshold_one_is_the_plain_engine(tiny):
    folder, heads = tiny
    plain = [r.token_ids for r in LLM(str(folder), **COMMON).generate(PROMPTS, GREEDY, use_tqdm=False)]
    llm = LLM(str(folder), early_exit_heads=str(heads), early_exit_threshold=1.0, **COMMON)
    assert [r.token_ids for r in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == plain
    assert llm.engine.early_exit.stats["candidates"] == 0


@pytest.mark.parametrize("prompts, threshold, exit_layers", [(PROMPTS[:1], 0.55, {1}), (PROMPTS, 0.45, {1, 2})])
def test_exits_match_a_dense_reference(tiny, prompts, threshold, exit_layers):
    """One request, then three decoding together (a step exits only when all three may): some steps exit
    (after layer 1, or 2), some run all four. A token-by-token reference with its own dense K/V lists (state
    propagation into the skipped layers) must give the same greedy tokens; no block is left allocated."""
    folder, heads_path = tiny
    llm = LLM(str(folder), early_exit_heads=str(heads_path), early_exit_threshold=threshold, **COMMON)
    got = [r.token_ids for r in llm.generate(prompts, GREEDY, use_tqdm=False)]
    stats = llm.engine.early_exit.stats
    assert {layer for layer, n in stats["by_layer"].items() if n} == exit_layers
    assert 0 < stats["exited"] < stats["candidates"]
    model, heads = llm.engine.model, llm.engine.early_exit.heads
    assert got == dense_reference(model, heads, prompts, GREEDY.max_tokens, threshold)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks   # nothing leaked
    metrics = ServerMetrics("m", None, heads.layers)
    metrics.on_step(llm.engine.stats(), [], 0.01)
    text = metrics.render().decode()
    assert f'effinfer:early_exit_tokens_total{{layer="1",model_name="m"}} {stats["by_layer"][1]:.1f}' in text
    assert f'effinfer:early_exit_candidate_tokens_total{{model_name="m"}} {stats["candidates"]:.1f}' in text


def test_always_exiting_is_the_truncated_model(tiny):
    """Threshold 0: every decode token exits at the first head, so each output token (after the first,
    which the prompt's full pass gives) is that head's argmax over the first layers run on the sequence."""
    folder, heads_path = tiny
    llm = LLM(str(folder), early_exit_heads=str(heads_path), **COMMON)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, early_exit_threshold=0.0)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    plain = LLM(str(folder), **COMMON)
    model, head = plain.engine.model, llm.engine.early_exit.heads[1]
    for prompt, out in zip(PROMPTS, outs):
        ids = prompt + out.token_ids
        full, hidden = score_with_layer_output(plain, ids, 1)
        with torch.inference_mode():
            exit_argmax = model.compute_logits(head.features(hidden[0])).argmax(-1)
        assert out.token_ids[0] == int(full[len(prompt) - 1].argmax())
        assert out.token_ids[1:] == exit_argmax[len(prompt):-1].tolist()


def test_scoring_with_exits_decodes_token_by_token(tiny):
    """`score` with early exit on gives the distributions decoding would use: at threshold 0, every
    position's is the first head's over the first two layers (perplexity and KL in `bench` use this)."""
    folder, heads_path = tiny
    llm = LLM(str(folder), early_exit_heads=str(heads_path), early_exit_threshold=0.0, **COMMON)
    ids = list(range(3, 40))
    model, head = llm.engine.model, llm.engine.early_exit.heads[1]
    got, hidden = score_with_layer_output(llm, ids, 1)
    with torch.inference_mode():
        want = torch.log_softmax(model.compute_logits(head.features(torch.cat(hidden))), dim=-1)
    assert len(hidden) == len(ids)                                # one forward per token
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, LLM(str(folder), **COMMON).score(ids), atol=1e-3)


def test_exit_outputs_stay_out_of_the_prefix_cache(tiny):
    folder, heads_path = tiny
    llm = LLM(str(folder), early_exit_heads=str(heads_path), early_exit_threshold=0.0, block_size=4, **COMMON)
    prompt = list(range(40, 49))                               # 2 full blocks of prompt
    llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert len(llm.engine.block_manager.cached) == len(prompt) // 4


def test_bad_settings_are_clear_errors(tiny, tmp_path):
    folder, heads_path = tiny
    with pytest.raises(ValueError, match="needs an engine with exit heads"):
        LLM(str(folder), **COMMON).generate([[5, 6]], SamplingParams(early_exit_threshold=0.5), use_tqdm=False)
    with pytest.raises(ValueError, match="do not combine"):
        LLM(str(folder), early_exit_heads=str(heads_path), speculative_method="ngram", **COMMON)
    with pytest.raises(ValueError, match="between 0 and 1"):
        SamplingParams(early_exit_threshold=1.5)
    other = tmp_path / "other"
    save_tiny_folder("llama", other)                           # 2 layers: the heads were trained for 4
    with pytest.raises(ValueError, match="trained for a model of 4 layers"):
        LLM(str(other), early_exit_heads=str(heads_path), **COMMON)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable exit-heads file"):
        LLM(str(folder), early_exit_heads=str(tmp_path / "junk.safetensors"), **COMMON)


def test_exit_heads_learn_the_final_layer(tmp_path):
    save_tiny_folder("qwen2", tmp_path, num_layers=4)
    text = " ".join(f"w{i}" for i in np.random.default_rng(0).integers(1, 256, 3000))
    cfg = ExitHeadsConfig(layers="1,2", steps=30, batch_size=4, seq_len=32, lr=1e-2, eval_windows=4)
    report = distill_exit_heads(str(tmp_path), text, tmp_path.parent / f"{tmp_path.name}-heads.safetensors", cfg,
                                show_progress=False)
    for layer in (1, 2):
        before, after = report["held_out_before"][f"layer_{layer}"], report["held_out_after"][f"layer_{layer}"]
        assert after["kl"] < 0.7 * before["kl"]                # it learned the final layer, on held-out text
    llm = LLM(str(tmp_path), early_exit_heads=report["path"], early_exit_threshold=0.0, **COMMON)
    assert llm.engine.early_exit.heads.layers == [1, 2]
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.8, seed=1), use_tqdm=False)  # sampling runs


def score_with_layer_output(llm, ids: list[int], layer: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`llm.score(ids)` and the hidden states that came out of `layer` on the way, one tensor per forward."""
    captured = []
    hook = llm.engine.model.model.layers[layer].register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        scores = llm.score(ids)
    finally:
        hook.remove()
    return scores, captured


def dense_reference(model, heads, prompts: list[list[int]], max_tokens: int, threshold: float) -> list[list[int]]:
    """Decode the sequences in lockstep, a token at a time, with plain per-layer K/V lists: a step leaves
    after an exit layer when every sequence's head is confident, and the skipped layers get K/V projected
    from the exit state."""
    layers = model.model.layers
    caches = [([[] for _ in layers], [[] for _ in layers]) for _ in prompts]

    def kv(cache, index, x, rope):
        _, k, v = layers[index].self_attn.split_qkv(layers[index].input_layernorm(x))
        cache[0][index].append(apply_rotary(k, *rope))
        cache[1][index].append(v)

    def run_layer(cache, index, h, rope):
        attn = layers[index].self_attn
        q, _, _ = attn.split_qkv(layers[index].input_layernorm(h))
        kv(cache, index, h, rope)
        group = attn.num_heads // attn.num_kv_heads
        k = torch.cat(cache[0][index]).repeat_interleave(group, dim=1)
        v = torch.cat(cache[1][index]).repeat_interleave(group, dim=1)
        probs = (torch.einsum("qhd,khd->hqk", apply_rotary(q, *rope), k) * attn.attn.scale).softmax(-1)
        h = h + attn.o_proj(torch.einsum("hqk,khd->qhd", probs, v).reshape(1, -1))
        return h + layers[index].mlp(layers[index].post_attention_layernorm(h))

    def step(step_caches, tokens, positions, may_exit):
        hs = [model.embed(torch.tensor([t])) for t in tokens]
        ropes = [model.rotary_emb(torch.tensor([p]), hs[0].dtype) for p in positions]
        for index in range(len(layers)):
            hs = [run_layer(c, index, h, r) for c, h, r in zip(step_caches, hs, ropes)]
            if may_exit and index in heads.layers:
                features = [heads[index].features(h) for h in hs]
                if all(float(heads[index].confidence(f)) > threshold for f in features):
                    for c, h, r in zip(step_caches, hs, ropes):
                        for skipped in range(index + 1, len(layers)):
                            kv(c, skipped, h, r)
                    return [model.compute_logits(f) for f in features]
        return [model.compute_logits(model.model.norm(h)) for h in hs]

    with torch.inference_mode():
        last = []
        for cache, prompt in zip(caches, prompts):         # prompts: every layer, one sequence at a time
            for position, token in enumerate(prompt):
                logits = step([cache], [token], [position], may_exit=False)[0]
            last.append(logits)
        outs = [[] for _ in prompts]
        for _ in range(max_tokens):
            for out, logits in zip(outs, last):
                out.append(int(logits.argmax()))
            last = step(caches, [o[-1] for o in outs], [len(p) + len(o) - 1 for p, o in zip(prompts, outs)], True)
    return outs
