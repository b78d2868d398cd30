"""Images as people look at them: [-1, 1] tensors quantised to uint8 the way PNG files store
them (`to_uint8`, which the metrics use too) and PNG grids of samples (`save_grid`: the
sample, teacher and evaluation grids)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from core.base.errors import UserError
from core.base.io import atomic_path


def to_uint8(images) -> Tensor:
    """[-1, 1] images (tensor or array) -> uint8 tensor: round((x + 1) * 127.5) clipped.

    Computed in float32 (the datasets' dtype); torch.round and numpy.round both round half to
    even, so ``np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)`` on the same
    float32 array gives identical bytes.
    """
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images)
    x = x.detach().to("cpu", torch.float32)
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def save_grid(images, path, nrow: Optional[int] = None, labels: Optional[Sequence] = None,
              padding: int = 2) -> Path:
    """A PNG grid of [-1, 1] images [N, C, H, W] (``nrow`` per row, default ~sqrt(N)), written
    atomically. Images under 64 pixels a side are upscaled x2 (nearest) so 28x28 is legible;
    ``labels`` (one per image) are written into each tile's top-left corner."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    u8 = to_uint8(images)
    if u8.dim() != 4 or u8.shape[1] not in (1, 3) or len(u8) == 0:
        raise UserError(f"save_grid: expected images [N, 1 or 3, H, W], got {list(u8.shape)}")
    n, _, h, w = u8.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    grid = make_grid(u8, nrow=nrow, padding=padding, pad_value=255)
    img = Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy())
    scale = 2 if max(h, w) < 64 else 1
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    if labels is not None:
        draw = ImageDraw.Draw(img)
        for i, lab in enumerate(list(labels)[:n]):
            r, c = divmod(i, nrow)
            x0, y0 = (c * (w + padding) + padding) * scale, (r * (h + padding) + padding) * scale
            text = str(lab.item() if hasattr(lab, "item") else lab)
            box = draw.textbbox((x0 + 1, y0), text)
            draw.rectangle(box, fill=(0, 0, 0))
            draw.text((x0 + 1, y0), text, fill=(255, 255, 0))
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path
