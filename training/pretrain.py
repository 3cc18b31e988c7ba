"""Stand-in CLIP weights for machines where no pretrained CLIP can be downloaded.

Trains a whole (small) open_clip model on a labelled image folder so that its image features match the
text features of captions made from the class names: the same zero-shot structure a real CLIP has, made
in minutes on a CPU. The captions are the bare class names by default, so that, as with a real CLIP, a
prompt such as "a photo of a {}." is not what the model saw and a learned prompt (stage 1) does better.
Demos and tests use it in place of OpenAI's weights; real runs never need it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from .data.datasets import Split
from .data.views import ViewDataset, collate_skipping
from .runtime import seed_everything
from .towers import load_clip, tokenizer_for
from .transforms import train_transform

# Stand-in weights for tiny photos: crops keep at least half the area (0.08 of a 28 px photo is a 8 px patch).
PRETRAIN_CROP = (0.5, 1.0)

log = logging.getLogger(__name__)

CAPTION = "{}"


def pretrain_clip(
    model_name: str, split: Split, out: Path, epochs: int = 5, batch_size: int = 64, lr: float = 1e-3,
    seed: int = 0, template: str = CAPTION,
) -> float:
    """Train `model_name` from random weights on `split`; save an open_clip state dict; return last loss."""
    seed_everything(seed)
    model, pre = load_clip(model_name, None)
    model.train()
    tokens = tokenizer_for(model_name)([template.format(c) for c in split.classnames])
    dataset = ViewDataset(split.items, train_transform(pre, PRETRAIN_CROP), seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=collate_skipping,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    loss = torch.tensor(0.0)
    for epoch in range(epochs):
        dataset.view = epoch  # a fresh augmentation of every image each epoch
        bar = tqdm(loader, desc=f"pretrain {model_name} {epoch + 1}/{epochs}", leave=False, disable=None)
        for images, _, labels, _ in bar:
            if not len(labels):
                continue
            image_features = F.normalize(model.encode_image(images), dim=-1)
            text_features = F.normalize(model.encode_text(tokens), dim=-1)
            logits = model.logit_scale.exp() * image_features @ text_features.t()
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        log.info("pretrain %s epoch %d loss %.4f", model_name, epoch + 1, loss.item())
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    return float(loss.item())
