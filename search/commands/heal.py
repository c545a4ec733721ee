"""Healing a pruned model: LoRA (QLoRA on CUDA) on the surviving sublayers' projections, then merged.

The model is trained on a copy (4-bit NF4 via bitsandbytes when CUDA is available and ``quantize`` is ``auto``,
else float32/bfloat16), on next-token loss over a healing corpus, optionally mixed with a distillation loss
(KL to the dense model's logits). The trained adapters are merged into a full-precision copy of the pruned
model with ``merge_and_unload``, so the healed model is a plain transformers model with no peft inside.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from objectives.calibration import DataError, TextSource, load_text, tokenize
from search.confirm_settings import HealSettings  # noqa: F401 - the settings this module trains with
from surgery.families import family_for
from surgery.errors import UserError

class HealError(UserError):
    """Healing settings or data that cannot be used."""


@dataclass
class HealResult:
    """The merged healed model and how it was trained."""

    model: nn.Module
    losses: list[float]  # training loss per step
    lm_losses: list[float]  # next-token part per step
    seconds: float
    trainable: int  # LoRA parameters trained
    mode: str  # "lora-float32", "lora-bfloat16" or "qlora-nf4"
    targets: list[str] = field(default_factory=list)


# data ----------------------------------------------------------------------------------------------------
def corpus_windows(source: TextSource, tokenizer, seq_len: int) -> torch.Tensor:
    """Every non-overlapping ``seq_len`` window of the corpus' token stream: ``[n, seq_len]``."""
    stream = tokenize(load_text(source), tokenizer)
    windows = len(stream) // seq_len
    if windows == 0:
        raise DataError(f"healing corpus {source.describe()} has {len(stream)} tokens: fewer than seq_len={seq_len}")
    return stream[: windows * seq_len].view(windows, seq_len)


def batches(data: torch.Tensor, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """``steps`` batches of rows, each epoch in a fresh seeded order."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(len(data), generator=generator).tolist()
        chosen, order = order[:batch_size], order[batch_size:]
        yield data[chosen]


# model preparation ---------------------------------------------------------------------------------------
def lora_targets(model: nn.Module) -> list[str]:
    """The family's LoRA target names that the (pruned) model still contains."""
    wanted = family_for(model.config).lora
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    found = [name for name in wanted if name in present]
    if not found:
        raise HealError(f"no LoRA target modules ({', '.join(wanted)}) left in the pruned model")
    return found


def plan(settings: HealSettings, device: torch.device) -> tuple[bool, torch.dtype]:
    """(4-bit?, training dtype) for a device: QLoRA on CUDA by default, float32 LoRA on CPU."""
    cuda = device.type == "cuda"
    if settings.quantize == "4bit" and not cuda:
        raise HealError("heal.quantize: 4bit (QLoRA) needs a CUDA device; use quantize: none or auto on CPU")
    quantize = settings.quantize == "4bit" or (settings.quantize == "auto" and cuda and _has_bitsandbytes())
    if settings.dtype == "auto":
        dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = getattr(torch, settings.dtype)
    return quantize, dtype


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def _load_4bit(pretrained_dir: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                               bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(str(pretrained_dir), quantization_config=quant,
                                                 device_map={"": device.index or 0}, trust_remote_code=True)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def training_copy(pruned: nn.Module, settings: HealSettings, device: torch.device, pretrained_dir=None):
    """(model to train, mode name): a 4-bit reload of the exported pruned model, or a float copy."""
    quantize, dtype = plan(settings, device)
    if quantize:
        if pretrained_dir is None:
            raise HealError("QLoRA needs the exported pruned model directory to load in 4 bits")
        return _load_4bit(Path(pretrained_dir), dtype, device), "qlora-nf4"
    model = copy.deepcopy(pruned).to(device=device, dtype=dtype)
    return model, f"lora-{str(dtype).removeprefix('torch.')}"


def lora_config(settings: HealSettings, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


# training ------------------------------------------------------------------------------------------------
def step_loss(model, ids: torch.Tensor, settings: HealSettings, teacher=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, next-token loss) of one batch: (1 - distill) * LM + distill * T^2 * KL(dense || pruned)."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    vocab = logits.shape[-1]
    lm = F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
    if teacher is None or settings.distill == 0.0:
        return lm, lm
    with torch.no_grad():
        target = teacher(input_ids=ids.to(teacher.device)).logits[:, :-1].float().to(logits.device)
    t = settings.temperature
    kl = F.kl_div(F.log_softmax(logits / t, -1).reshape(-1, vocab), F.log_softmax(target / t, -1).reshape(-1, vocab),
                  log_target=True, reduction="batchmean") * t * t
    return (1.0 - settings.distill) * lm + settings.distill * kl, lm


def train(model, data: torch.Tensor, settings: HealSettings, *, teacher=None, progress=True):
    """AdamW on the trainable (LoRA) parameters with warm-up and cosine decay; (losses, lm_losses)."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(settings.warmup, settings.steps), settings.steps)
    device = next(p.device for p in params)
    losses, lm_losses = [], []
    model.train()
    bar = tqdm(batches(data, settings.batch_size, settings.steps, settings.seed), total=settings.steps,
               desc="healing", unit="step", disable=not progress, leave=False)
    for ids in bar:
        loss, lm = step_loss(model, ids.to(device), settings, teacher)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        lm_losses.append(lm.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.eval()
    return losses, lm_losses


def merge_into(pruned: nn.Module, trained, config) -> nn.Module:
    """The trained adapters merged into a full-precision copy of ``pruned``: a plain transformers model."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    state = {k: v.detach().to(device=next(pruned.parameters()).device, dtype=torch.float32)
             for k, v in get_peft_model_state_dict(trained).items()}
    target = get_peft_model(copy.deepcopy(pruned), config)
    set_peft_model_state_dict(target, state)
    merged = target.merge_and_unload()
    return merged.eval()


def heal(pruned: nn.Module, data: torch.Tensor, settings: HealSettings, *, teacher=None, device=None,
         pretrained_dir=None, progress: bool = True) -> HealResult:
    """Heal ``pruned`` (left unchanged) on token windows ``data [n, seq_len]``; returns the merged model."""
    from peft import get_peft_model

    if data.ndim != 2 or len(data) == 0:
        raise HealError(f"healing data must be a non-empty [n, seq_len] token tensor, got shape {tuple(data.shape)}")
    device = torch.device(device) if device is not None else next(pruned.parameters()).device
    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    base, mode = training_copy(pruned, settings, device, pretrained_dir)
    targets = lora_targets(base)
    config = lora_config(settings, targets)
    trained = get_peft_model(base, config)
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    losses, lm_losses = train(trained, data, settings, teacher=teacher, progress=progress)
    merged = merge_into(pruned, trained, config)
    return HealResult(merged, losses, lm_losses, time.perf_counter() - started, trainable, mode, targets)


def healed_into_dense(dense: nn.Module, healed: nn.Module, mask) -> nn.Module:
    """A copy of the dense model carrying the healed weights at the kept sublayers (so export_pruned can
    re-prune it with the original mask and layer numbering)."""
    prefix = family_for(dense.config).layers + "."
    kept = [i for i, (a, m) in enumerate(mask.layer_items()) if a or m]
    state = {}
    for key, value in healed.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            key = f"{prefix}{kept[int(index)]}.{rest}"
        state[key] = value
    target = copy.deepcopy(dense)
    unexpected = target.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"healed weights that the dense model does not have: {unexpected[:5]}")
    return target
