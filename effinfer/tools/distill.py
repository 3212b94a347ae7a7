"""Knowledge distillation (Hinton et al., 2015) into a shallow student that keeps the teacher's tokenizer:
`effinfer distill`.

The student is the teacher with a few of its own decoder layers (evenly spaced, first and last kept:
DistilBERT's initialisation from the teacher), sharing its embedding, final norm and output head, which
stay frozen. It learns the teacher's next-token distributions (forward KL, token level) on windows of a
development corpus: the teacher (effinfer's engine, no gradients) scores each window, the student
(transformers' implementation of the same architecture, for autograd) trains on them with AdamW and a
cosine schedule. The result is a Hugging Face folder that loads like any model; its use here is a
draft model for speculative decoding (`--speculative-method draft_model --speculative-model DIR`),
which keeps the teacher's output exact whatever the student's quality.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from effinfer.utils import progress


@dataclass
class DistillConfig:
    num_layers: int = 6
    """Student depth: this many teacher layers, evenly spaced (first and last included)."""
    layers: str | None = None
    """Explicit teacher layers to keep, e.g. "0,5,10,15,20,29" (overrides num_layers)."""
    steps: int = 200
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 3e-4
    save_every: int = 50
    """Write the student folder every this many steps (and at the end)."""
    eval_windows: int = 8
    """Held-out windows (the end of the corpus) for the KL and top-1 agreement reported before and after."""
    seed: int = 0

    def __post_init__(self) -> None:
        _check_training(self, "distill", ("num_layers", "save_every"))
        if self.layers and not all(x.strip().isdigit() for x in self.layers.split(",")):
            raise ValueError(f"distill layers={self.layers!r}: expected layer indices like 0,5,10,29")


def distill(teacher: str, text: str, out_dir: str | Path, cfg: DistillConfig, cache_dir: str | None = None,
            show_progress: bool = True) -> dict:
    """Train and save a student of `teacher` on `text`; returns the report written beside it."""
    start = time.perf_counter()
    llm, train, held_out = _teacher_and_windows(teacher, text, cfg, cache_dir, show_progress)
    keep = student_layers(llm.engine.loaded.config.num_layers, cfg)
    student = build_student(llm.engine.loaded, keep, cache_dir, show_progress)
    before = evaluate(student, llm, held_out)

    def checkpoint(step: int) -> None:
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save_student(student, llm.engine.loaded, keep, out_dir)

    params = [p for p in student.parameters() if p.requires_grad]
    losses = _train(params, lambda batch: kl_loss(student, llm, batch), train, cfg, "distill", show_progress, checkpoint)
    after = evaluate(student, llm, held_out)
    report = {"teacher": str(llm.engine.loaded.path), "teacher_layers": keep,
              **_train_report(cfg, train, before, after, losses, start)}
    path = save_student(student, llm.engine.loaded, keep, out_dir)
    (path / "effinfer_distill.json").write_text(json.dumps(report, indent=2))
    return {**report, "path": str(path)}


def _check_training(cfg, command: str, counts: tuple[str, ...] = ()) -> None:
    for name in (*counts, "steps", "batch_size", "seq_len", "eval_windows"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{command} {name}={getattr(cfg, name)} must be at least 1")
    if not 0 < cfg.lr < 1:
        raise ValueError(f"{command} lr={cfg.lr} must be between 0 and 1")


def _teacher_and_windows(model: str, text: str, cfg, cache_dir: str | None, show_progress: bool):
    """The teacher (effinfer's engine, bf16) and the corpus cut into training and held-out windows."""
    from effinfer.llm import LLM

    torch.manual_seed(cfg.seed)
    llm = LLM(model, dtype="bfloat16", quantization=None, cache_dir=cache_dir, kv_cache_memory_gb=0.25,
              show_progress=show_progress, max_num_batched_tokens=max(2048, cfg.seq_len))
    windows = _windows(llm.tokenizer.encode(text), cfg.seq_len, cfg.batch_size + cfg.eval_windows)
    return llm, windows[:-cfg.eval_windows], windows[-cfg.eval_windows:]


def _train(params: list, loss_fn, train: list[list[int]], cfg, name: str, show_progress: bool,
           after_step=None) -> list[float]:
    """AdamW with a cosine schedule and gradient clipping over random batches of `train`; the losses."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    generator = torch.Generator().manual_seed(cfg.seed)
    bar = progress(range(cfg.steps), name, show_progress, unit="step")
    losses = []
    for step in bar:
        batch = [train[int(i)] for i in torch.randint(len(train), (cfg.batch_size,), generator=generator)]
        loss = loss_fn(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if show_progress:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if after_step is not None:
            after_step(step)
    return losses


def _train_report(cfg, train: list, before: dict, after: dict, losses: list[float], start: float) -> dict:
    return {"config": asdict(cfg), "train_windows": len(train), "train_tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
            "held_out_before": before, "held_out_after": after,
            "loss_first_last": [round(losses[0], 4), round(sum(losses[-10:]) / len(losses[-10:]), 4)],
            "seconds": round(time.perf_counter() - start, 1)}


def student_layers(num_layers: int, cfg: DistillConfig) -> list[int]:
    if cfg.layers:
        keep = sorted({int(x) for x in cfg.layers.split(",")})
        if keep[0] < 0 or keep[-1] >= num_layers:
            raise ValueError(f"distill layers={cfg.layers!r}: the teacher has layers 0-{num_layers - 1}")
        return keep
    if cfg.num_layers >= num_layers:
        raise ValueError(f"a student of {cfg.num_layers} layers is no smaller than the {num_layers}-layer teacher")
    step = (num_layers - 1) / max(1, cfg.num_layers - 1)
    return sorted({round(i * step) for i in range(cfg.num_layers)})


def build_student(loaded, keep: list[int], cache_dir: str | None, show_progress: bool):
    """transformers' model of the teacher's architecture with only `keep` layers, filled from the teacher's
    checkpoint (fp32 for training); everything but the decoder layers is frozen."""
    import transformers

    from effinfer.loader.arch_config import to_hf_config
    from effinfer.loader.source import open_weights

    transformers.logging.set_verbosity_error()
    hf = to_hf_config(_student_arch(loaded.config, keep))
    config = transformers.AutoConfig.for_model(**hf)
    student = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    renamed = {f"model.layers.{old}.": f"model.layers.{new}." for new, old in enumerate(keep)}
    state = {}
    for name, tensor in open_weights(loaded.path, cache_dir, show_progress):
        if name.startswith("model.layers."):
            prefix = ".".join(name.split(".")[:3]) + "."
            if prefix not in renamed:
                continue
            name = renamed[prefix] + name[len(prefix):]
        state[name] = tensor.float()
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and loaded.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"the teacher's checkpoint does not fit the student: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    student.tie_weights()
    for name, p in student.named_parameters():
        p.requires_grad_(name.startswith("model.layers."))
    return student.train()


def kl_loss(student, llm, batch: list[list[int]]) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of the next-token distributions."""
    with torch.no_grad():
        teacher = torch.stack([llm.score(ids) for ids in batch])        # [B, T, V] log-probs, fp32
    logits = student(input_ids=torch.tensor(batch)).logits.float()
    return _kl(teacher, torch.log_softmax(logits, dim=-1)).mean()


@torch.no_grad()
def evaluate(student, llm, windows: list[list[int]]) -> dict:
    """KL(teacher || student) per token and how often the two argmaxes agree (a greedy draft's acceptance)."""
    was_training = student.training
    student.eval()
    kl = agree = count = 0.0
    for ids in windows:
        teacher = llm.score(ids)
        student_logp = torch.log_softmax(student(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
        kl += float(_kl(teacher, student_logp).sum())
        agree += float((teacher.argmax(-1) == student_logp.argmax(-1)).sum())
        count += len(ids)
    student.train(was_training)
    return {"kl": round(kl / count, 4), "top1_agreement": round(agree / count, 4)}


def _kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position, from log-probabilities over the last axis."""
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)


def save_student(student, loaded, keep: list[int], out_dir: str | Path) -> Path:
    """A Hugging Face folder (bf16 safetensors, config.json, tokenizer files) that loads as a model."""
    from safetensors.torch import save_file

    from effinfer.loader.arch_config import to_hf_config

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tied = loaded.config.tie_word_embeddings
    tensors = {name: t.detach().to(torch.bfloat16).contiguous() for name, t in student.state_dict().items()
               if not (tied and name == "lm_head.weight")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(to_hf_config(_student_arch(loaded.config, keep)), indent=2))
    tokenizer = loaded.tokenizer
    tokenizer.backend.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "chat_template": tokenizer.chat_template}))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": tokenizer.eos_token_ids}))
    return out


def _student_arch(arch, keep: list[int]):
    from dataclasses import replace

    return replace(arch, num_layers=len(keep), layer_types=[arch.layer_types[i] for i in keep])


def _windows(ids: list[int], seq_len: int, minimum: int) -> list[list[int]]:
    windows = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    if len(windows) < minimum:
        raise ValueError(f"the distillation text has {len(ids)} tokens: {len(windows)} windows of {seq_len}; "
                         f"it needs at least {minimum} (a batch plus the held-out windows)")
    return windows


# ---- exit heads (early exit) ---------------------------------------------------------------------------

@dataclass
class ExitHeadsConfig:
    layers: str | None = None
    """Layers to put an exit head after, e.g. "14,21" (default: at one half and three quarters of the depth)."""
    steps: int = 200
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 1e-3
    eval_windows: int = 8
    """Held-out windows (the end of the corpus) for the report before and after training."""
    seed: int = 0

    def __post_init__(self) -> None:
        _check_training(self, "exit-heads")


EXIT_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)


def distill_exit_heads(model: str, text: str, out_path: str | Path, cfg: ExitHeadsConfig, cache_dir: str | None = None,
                       show_progress: bool = True) -> dict:
    """Train exit heads of `model` on `text` (see decoding/early_exit.py) and save them; returns the report.

    Each head learns the final layer's next-token distribution from its layer's hidden state (KL, the
    model's own output head frozen behind the head's adapter and norm); its confidence classifier learns,
    at the same time, whether the head's argmax agrees with the full model's (binary cross-entropy on
    the detached features)."""
    from effinfer.decoding.early_exit import ExitHeads, parse_exit_layers

    start = time.perf_counter()
    llm, train, held_out = _teacher_and_windows(model, text, cfg, cache_dir, show_progress)
    arch, net = llm.engine.loaded.config, llm.engine.model
    layers = parse_exit_layers(cfg.layers, arch.num_layers)
    heads = ExitHeads(layers, net.model.norm, arch.hidden_size).train()
    head = _OutputHead(net)
    before = evaluate_exit_heads(heads, head, llm, held_out)

    def loss_fn(batch: list[list[int]]) -> torch.Tensor:
        teacher, hidden = _teacher_and_hidden(llm, batch, layers)
        return sum(_exit_head_loss(heads[layer], head, hidden[layer], teacher) for layer in layers)

    losses = _train(list(heads.parameters()), loss_fn, train, cfg, "exit heads", show_progress)
    after = evaluate_exit_heads(heads, head, llm, held_out)
    report = {"model": str(llm.engine.loaded.path), "exit_layers": layers, "num_layers": arch.num_layers,
              **_train_report(cfg, train, before, after, losses, start)}
    path = heads.save(out_path, str(llm.engine.loaded.path), arch.num_layers, report)
    Path(path).with_suffix(".json").write_text(json.dumps(report, indent=2))
    return {**report, "path": str(path)}


class _OutputHead:
    """The model's output projection in fp32 for training (frozen; Gemma's logit soft-capping kept)."""

    def __init__(self, model):
        self.weight = model.lm_head.weight.detach().float()
        self.cap = model.config.final_logit_softcapping

    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(features.float(), self.weight)
        if self.cap:
            logits = torch.tanh(logits / self.cap) * self.cap
        return torch.log_softmax(logits, dim=-1)


def _teacher_and_hidden(llm, batch: list[list[int]], layers: list[int]) -> tuple[torch.Tensor, dict]:
    """The full model's next-token log-probs [tokens, vocab] over the windows, and each exit layer's output
    hidden states [tokens, hidden] (fp32, usable by autograd: cloned outside inference mode)."""
    captured: dict[int, list] = {layer: [] for layer in layers}
    blocks = llm.engine.model.model.layers
    hooks = [blocks[layer].register_forward_hook(lambda _m, _i, out, layer=layer: captured[layer].append(out))
             for layer in layers]
    try:
        teacher = torch.cat([llm.score(ids) for ids in batch]).clone()
    finally:
        for hook in hooks:
            hook.remove()
    return teacher, {layer: torch.cat(parts).float() for layer, parts in captured.items()}


def _exit_head_loss(exit_head, head: _OutputHead, hidden: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    features = exit_head.features(hidden)
    student = head.log_probs(features)
    agree = (student.argmax(-1) == teacher.argmax(-1)).float()
    confidence_logit = exit_head.classifier(features.detach()).squeeze(-1)
    return _kl(teacher, student).mean() + torch.nn.functional.binary_cross_entropy_with_logits(confidence_logit, agree)


@torch.no_grad()
def evaluate_exit_heads(heads, head: _OutputHead, llm, windows: list[list[int]]) -> dict:
    """Teacher-forced on held-out windows: per head, KL to the full model and top-1 agreement; per confidence
    threshold, the share of tokens that would exit (at the first confident head), how often their token
    agrees with the full model's, and the share of decoder layers they skip."""
    teacher, hidden = _teacher_and_hidden(llm, windows, heads.layers)
    num_layers = len(llm.engine.model.model.layers)
    report, agrees, confidences = {}, {}, {}
    for layer in heads.layers:
        features = heads[layer].features(hidden[layer])
        student = head.log_probs(features)
        agrees[layer] = student.argmax(-1) == teacher.argmax(-1)
        confidences[layer] = heads[layer].confidence(features)
        report[f"layer_{layer}"] = {"kl": round(float(_kl(teacher, student).mean()), 4),
                                    "top1_agreement": round(float(agrees[layer].float().mean()), 4)}
    for threshold in EXIT_THRESHOLDS:
        remaining = torch.ones(teacher.shape[0], dtype=torch.bool)
        exited = agreed = skipped = 0
        for layer in heads.layers:
            leaving = remaining & (confidences[layer] > threshold)
            exited += int(leaving.sum())
            agreed += int((leaving & agrees[layer]).sum())
            skipped += int(leaving.sum()) * (num_layers - 1 - layer)
            remaining &= ~leaving
        report[f"threshold_{threshold}"] = {"exit_rate": round(exited / teacher.shape[0], 4),
                                            "agreement_of_exits": round(agreed / exited, 4) if exited else None,
                                            "layers_skipped": round(skipped / (teacher.shape[0] * num_layers), 4)}
    return report
