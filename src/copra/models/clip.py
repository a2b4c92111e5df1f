"""The paper's vision setting: HF `CLIPModel` with PEFT LoRA on both towers, as CLIP-LoRA trains it.

CopRA's image experiments start from CLIP-LoRA (Zanella & Ben Ayed, "Low-Rank Few-Shot Adaptation of
Vision-Language Models", CVPR 2024 workshops), so this module reproduces its recipe:

* LoRA (r=2, alpha=1, dropout 0.25) on q/k/v of every block of the text *and* vision towers;
* logits = 100 * cos(image feature, text feature of "a photo of a {class}."), where the class
  prompts go through the LoRA-adapted text tower at every step (both towers are trained);
* training images: RandomResizedCrop(224, scale=(0.08, 1), bicubic) + horizontal flip, then CLIP's
  normalisation; evaluation images: CLIP's preprocessing (shortest side to 224 bicubic, centre crop).

The augmentation re-implements torchvision's (which cannot be installed beside every torch build)
with PIL, numpy and torch, drawing from torch's global RNG in the same order, so a run seeded with
`torch.manual_seed` is reproducible. Everything else is plain transformers + PEFT, so the adapter a
run saves loads with `PeftModel.from_pretrained(CLIPModel.from_pretrained(name), folder)`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from copra.models.scoring import PromptScoring
from copra.utils.compat import checkpoint_file
from copra.utils.errors import UserError
from copra.utils.precision import autocast_of

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP_SCALE = (0.08, 1.0)  # CLIP-LoRA's RandomResizedCrop scale
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision's default aspect-ratio range

ImageLike = str | os.PathLike | Image.Image


def load_image(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a path (or a PIL image); UserError naming an unreadable file."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"image not found: {image}") from None
    except (UnidentifiedImageError, OSError) as error:
        raise UserError(f"cannot read image {image}: {error}") from None


def resize_shortest(image: Image.Image, size: int) -> Image.Image:
    """Shortest side to `size` (bicubic), the other side scaled and truncated like torchvision.Resize(int)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return image
    new_long = int(size * long / short)
    new = (size, new_long) if w <= h else (new_long, size)
    return image.resize(new, Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Central size x size crop (padded with black first if the image is smaller, like torchvision)."""
    w, h = image.size
    if w < size or h < size:
        pad_w, pad_h = max(size - w, 0), max(size - h, 0)
        image = ImageOps.expand(image, (pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2), fill=0)
        w, h = image.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def random_resized_crop_box(
    width: int, height: int, scale: Sequence[float] = CROP_SCALE, ratio: Sequence[float] = CROP_RATIO
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop, drawn from torch's global RNG as torchvision's get_params does."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return top, left, h, w
    in_ratio = width / height  # fallback: central crop with the ratio clamped
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment(image: Image.Image, size: int) -> Image.Image:
    """CLIP-LoRA's training transform before ToTensor: RandomResizedCrop(bicubic) + RandomHorizontalFlip."""
    top, left, h, w = random_resized_crop_box(*image.size)
    image = image.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    if torch.rand(1).item() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image


def to_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[3, H, W] float tensor in [0, 1], normalised per channel."""
    array = np.asarray(image, dtype=np.float32) / 255.0  # [H, W, 3]
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _features(output) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4.x) or an output whose pooler_output is projected (5.x)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipClassifier(PromptScoring, nn.Module):
    """CLIP as a few-shot classifier: logits = scale * cos(image, class prompt), both towers LoRA-adapted.

    `encoder` is a PeftModel around a transformers `CLIPModel` (LoRA layers are injected in place, so
    calls through the wrapped model use them). Call `set_prompts` before use.
    """

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer,
        scale: float = 100.0,
        image_size: int = 224,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        max_length: int = 77,
    ):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.scale = scale
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.max_length = max_length
        self.prompts: list[str] = []
        self._prompt_inputs: dict[str, torch.Tensor] | None = None
        self.precision = "fp32"  # set by copra.models.build_classifier (copra.utils.precision)

    @property
    def clip(self) -> nn.Module:
        """The CLIPModel inside the PEFT wrapper (with the LoRA layers in it)."""
        get_base = getattr(self.encoder, "get_base_model", None)
        return get_base() if callable(get_base) else self.encoder

    def _device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def set_prompts(self, prompts: list[str]) -> None:
        """The class prompts, one per class (e.g. task.prompts()), tokenised once."""
        if not prompts:
            raise UserError("a classifier needs at least one class prompt")
        self.prompts = list(prompts)
        batch = self.tokenizer(
            self.prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        self._prompt_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def class_embeddings(self) -> torch.Tensor:
        """Unit-norm text features of the class prompts [C, D], through the LoRA-adapted text tower."""
        if self._prompt_inputs is None:
            raise UserError("call set_prompts(task.prompts()) before classifying")
        device = self._device()
        inputs = {k: v.to(device) for k, v in self._prompt_inputs.items()}
        with autocast_of(self, device):  # the classifier's precision (copra.utils.precision); features in fp32
            features = _features(self.clip.get_text_features(**inputs))
        return F.normalize(features.float(), dim=-1)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unit-norm image features [B, D]: vision tower + visual projection."""
        device = self._device()
        pixel_values = pixel_values.to(device=device, dtype=torch.float32)
        with autocast_of(self, device):
            features = _features(self.clip.get_image_features(pixel_values=pixel_values))
        return F.normalize(features.float(), dim=-1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] (training's cross-entropy reads them; `scores` gives the cosines)."""
        return self.logits_of(self.embed(pixel_values))

    def preprocess(self, image: ImageLike, train: bool = False) -> torch.Tensor:
        """One image as a [3, S, S] tensor: CLIP-LoRA's augmentation if `train`, else CLIP's eval transform."""
        picture = load_image(image)
        if train:
            picture = augment(picture, self.image_size)
        else:
            picture = center_crop(resize_shortest(picture, self.image_size), self.image_size)
        return to_tensor(picture, self.mean, self.std)

    def inputs_for(self, image_paths: Sequence[ImageLike], train: bool = False) -> dict[str, torch.Tensor]:
        """{"pixel_values": [B, 3, S, S]} for image paths (the training loop's collate step)."""
        if len(image_paths) == 0:
            raise UserError("inputs_for needs at least one image")
        return {"pixel_values": torch.stack([self.preprocess(p, train) for p in image_paths])}


def _normalization(path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """image_mean / image_std from the checkpoint's preprocessor_config.json, else CLIP's defaults."""
    found = checkpoint_file(path, "preprocessor_config.json")
    if not found:
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    try:
        data = json.loads(open(found, encoding="utf-8").read())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {found}: {error}") from None
    mean, std = data.get("image_mean", OPENAI_CLIP_MEAN), data.get("image_std", OPENAI_CLIP_STD)
    if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
        raise UserError(f"{found}: image_mean and image_std must hold 3 numbers (std > 0)")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def build_clip_classifier(config) -> ClipClassifier:
    """`config.model` (a local CLIP folder or hub name) with LoRA attached, as a ClipClassifier."""
    from transformers import AutoConfig, AutoTokenizer, CLIPConfig, CLIPModel

    from copra.models.loading import quiet_loading
    from copra.models.lora import attach_lora

    name = config.model
    hint = "backbone 'clip' needs a CLIP checkpoint: a local folder or a hub name such as openai/clip-vit-base-patch16"
    try:
        model_config = AutoConfig.from_pretrained(name)
        if not isinstance(model_config, CLIPConfig):
            raise UserError(f"model {name!r} is a {type(model_config).__name__}, not a CLIP model; {hint}")
        with quiet_loading():
            backbone = CLIPModel.from_pretrained(name, config=model_config, use_safetensors=True)  # never a pickle
            tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError) as error:
        if isinstance(error, UserError):
            raise
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"cannot load the CLIP model {name!r}: {detail}; {hint}") from None
    backbone = backbone.float().eval()  # fp32 master weights (transformers 5 keeps a checkpoint's fp16 by default)
    encoder = attach_lora(backbone, config)
    mean, std = _normalization(name)
    return ClipClassifier(
        encoder,
        tokenizer,
        scale=config.logit_scale,
        image_size=int(model_config.vision_config.image_size),
        mean=mean,
        std=std,
        max_length=int(model_config.text_config.max_position_embeddings),
    )
