"""The official probe data pipelines, one per evaluation dataset and task (`BenchmarkConfig.protocol = "paper"`).

Segmentation is mmseg 0.27's pipeline as FiT3D's `evaluation/configs/*_sem_linear_config.py`
configure it (DINOv2's linear-probe protocol); depth is the depth toolbox's pipeline of
`evaluation/configs/*_depth_linear_config.py`. `PAPER_PIPELINES[name][task]` holds each dataset's;
`docs/protocol.md` lists every value beside its official file.

| dataset | task | train | test |
|---|---|---|---|
| all mmseg sets | segmentation | keep-ratio resize into (2048, 512) × U(0.5, 2), random 512×512 crop (no class > 75 %), flip, photometric distortion, pad (labels 255) | keep-ratio resize into (2048, 512), sliding 512×512 windows at stride 341, logits averaged |
| nyuv2 | depth | NYU crop [45:472, 43:608], rotate ±2.5° (p 0.5), flip, random 416×544 crop, colour (brightness 0.75–1.25) | native size, flip-averaged |
| scannet, scannetpp | depth | as NYU without the NYU crop | native size, flip-averaged |
| kitti | depth | KB crop 352×1216 (bottom centre), rotate, flip, random 352×704 crop, colour (brightness 0.9–1.1) | KB crop, flip-averaged |

Images are `[3, H, W]` in [0, 1], as an `EvalDataset` gives them; the transforms work on the
0–255 scale where the official ones do (their ranges are in those units) and draw every random
number from a `torch.Generator`, so a probe seed fixes them. The official transforms run on
OpenCV uint8 images; these reproduce their operations and ranges, not OpenCV's bit-exact rounding.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _coin(probability: float, generator: torch.Generator) -> bool:
    return float(torch.rand((), generator=generator)) < probability


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """An integer in [low, high), as numpy's randint."""
    return int(torch.randint(low, high, (), generator=generator))


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's keep-ratio rule: the largest (H, W) with the long side <= max(scale) and the short side
    <= min(scale), each side rounded half up (`mmcv.imrescale`)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of `[3, H, W]` on the 0–255 scale, rounded to integers as OpenCV returns uint8 images."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0].round().clamp(0, 255)


def resize_nearest(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a `[H, W]` label or depth map (OpenCV's INTER_NEAREST rule)."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    return F.interpolate(target[None, None].float(), size=size, mode="nearest")[0, 0].to(target.dtype)


def _rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """`[3, H, W]` RGB on 0–255 -> OpenCV's 8-bit HSV: H in [0, 180), S and V in [0, 255], integers."""
    r, g, b = image
    value, _ = image.max(0)
    delta = value - image.min(0).values
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(
        value == r, 60 * (g - b) / safe, torch.where(value == g, 120 + 60 * (b - r) / safe, 240 + 60 * (r - g) / safe)
    )
    hue = torch.where(delta > 0, hue % 360, torch.zeros_like(hue))
    saturation = torch.where(value > 0, 255 * delta / torch.where(value > 0, value, torch.ones_like(value)), 0.0)
    return torch.stack([(hue / 2).round() % 180, saturation.round(), value])


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """OpenCV 8-bit HSV `[3, H, W]` -> RGB on 0–255, rounded to integers."""
    hue, saturation, value = hsv[0] * 2, hsv[1] / 255, hsv[2]

    def channel(n: float) -> torch.Tensor:
        k = (n + hue / 60) % 6
        return value - value * saturation * torch.clamp(torch.minimum(k, 4 - k), 0, 1)

    return torch.stack([channel(5), channel(3), channel(1)]).round().clamp(0, 255)


def photometric_distortion(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion of `[3, H, W]` on 0–255: each step with probability 0.5 —
    brightness ±32, contrast ×U(0.5, 1.5) (before or after the colour steps, at random), saturation
    ×U(0.5, 1.5), hue shift of an integer in [-18, 18) in OpenCV's 0–180 hue units."""

    def convert(x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
        return (x * alpha + beta).clamp(0, 255).floor()  # numpy's astype(uint8) truncates

    if _coin(0.5, generator):
        image = convert(image, beta=_uniform(-32, 32, generator))
    contrast_first = _coin(0.5, generator)
    if contrast_first and _coin(0.5, generator):
        image = convert(image, alpha=_uniform(0.5, 1.5, generator))
    if _coin(0.5, generator):
        hsv = _rgb_to_hsv(image)
        hsv[1] = convert(hsv[1], alpha=_uniform(0.5, 1.5, generator))
        image = _hsv_to_rgb(hsv)
    if _coin(0.5, generator):
        hsv = _rgb_to_hsv(image)
        hsv[0] = (hsv[0] + _randint(-18, 18, generator)) % 180
        image = _hsv_to_rgb(hsv)
    if not contrast_first and _coin(0.5, generator):
        image = convert(image, alpha=_uniform(0.5, 1.5, generator))
    return image


def rotate(image: torch.Tensor, target: torch.Tensor, degrees: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate `[3, H, W]` (bilinear) and `[H, W]` (nearest) about the image centre ((W-1)/2, (H-1)/2)
    by `degrees`, keeping the size; uncovered pixels become 0 (black image, invalid depth), as
    `mmcv.imrotate` with border value 0."""
    h, w = image.shape[-2:]
    angle = math.radians(degrees)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    cx, cy = (w - 1) / 2, (h - 1) / 2
    # the source pixel of every output pixel: the inverse rotation about the centre
    src_x = math.cos(angle) * (xs - cx) - math.sin(angle) * (ys - cy) + cx
    src_y = math.sin(angle) * (xs - cx) + math.cos(angle) * (ys - cy) + cy
    grid = torch.stack([2 * src_x / max(w - 1, 1) - 1, 2 * src_y / max(h - 1, 1) - 1], dim=-1)[None]
    image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    target = F.grid_sample(target[None, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=True)[0, 0]
    return image, target


def _random_crop_box(height: int, width: int, crop: tuple[int, int], generator: torch.Generator) -> tuple[int, int, int, int]:
    """(y1, y2, x1, x2) of a random `crop`-sized box (clipped to the image when it is smaller)."""
    y = _randint(0, max(height - crop[0], 0) + 1, generator)
    x = _randint(0, max(width - crop[1], 0) + 1, generator)
    return y, min(y + crop[0], height), x, min(x + crop[1], width)


def center_pad(pixel_values: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad `[B, 3, H, W]` with zeros to the next multiple of `multiple` on each side, split evenly
    (the extra pixel on the bottom/right): the official probes' `CenterPadding` before the backbone."""
    h, w = pixel_values.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    return F.pad(pixel_values, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


@dataclass(frozen=True)
class SegmentationPipeline:
    """mmseg's training augmentation and sliding-window test of the official segmentation probes.

    Args:
        scale: (long, short) bound of the keep-ratio resize (mmseg `img_scale` (2048, 512)).
        ratio_range: training resize: `scale` times U(ratio_range).
        crop_size: (H, W) of the training crop and of the sliding window.
        cat_max_ratio: re-draw a training crop (up to 10 times) while one class covers more than
            this fraction of its labelled pixels.
        flip_probability: horizontal flip.
        photometric: apply `photometric_distortion` when training.
        stride: (H, W) step of the sliding window.
    """

    task: ClassVar[str] = "segmentation"
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    crop_size: tuple[int, int] = (512, 512)
    cat_max_ratio: float = 0.75
    flip_probability: float = 0.5
    photometric: bool = True
    stride: tuple[int, int] = (341, 341)
    ignore_index: int = 255

    def train_sample(
        self, image: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One augmented sample: image `[3, H, W]` in [0, 1] and labels `[H, W]` -> a crop of at most
        `crop_size` (padding to it happens when batching: image 0 after normalisation, labels 255)."""
        ratio = _uniform(*self.ratio_range, generator)
        size = rescale_size(*image.shape[-2:], (int(self.scale[0] * ratio), int(self.scale[1] * ratio)))
        image, labels = resize_image(image * 255, size), resize_nearest(labels, size)
        box = _random_crop_box(*size, self.crop_size, generator)
        if self.cat_max_ratio < 1:
            for _ in range(10):
                counts = torch.bincount(labels[box[0] : box[1], box[2] : box[3]].flatten().long(), minlength=256)
                counts = counts[torch.arange(len(counts)) != self.ignore_index]
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = _random_crop_box(*size, self.crop_size, generator)
        image, labels = image[:, box[0] : box[1], box[2] : box[3]], labels[box[0] : box[1], box[2] : box[3]]
        if _coin(self.flip_probability, generator):
            image, labels = image.flip(-1), labels.flip(-1)
        if self.photometric:
            image = photometric_distortion(image, generator)
        return image / 255, labels

    def test_image(self, image: torch.Tensor) -> torch.Tensor:
        """The test image `[3, H, W]` in [0, 1], resized keeping its aspect ratio into `scale`."""
        return resize_image(image * 255, rescale_size(*image.shape[-2:], self.scale)) / 255

    def windows(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """(y1, y2, x1, x2) of the sliding windows over a `height` x `width` image (mmseg's `slide_inference`)."""
        (crop_h, crop_w), (stride_h, stride_w) = self.crop_size, self.stride
        rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
        cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
        boxes = []
        for i in range(rows):
            for j in range(cols):
                y2, x2 = min(i * stride_h + crop_h, height), min(j * stride_w + crop_w, width)
                boxes.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
        return boxes


@dataclass(frozen=True)
class DepthPipeline:
    """The depth toolbox's training augmentation and test of the official depth probes.

    Args:
        crop_size: (H, W) of the training crop.
        nyu_crop: training only: first crop image and depth to rows 45:472, columns 43:608 (NYUCrop).
        kb_crop: (H, W) of KITTI's benchmark crop (bottom rows, centred columns), applied to image
            and depth when training and testing (KBCrop), or None.
        rotate_probability, rotate_degrees: rotation by U(±rotate_degrees) with this probability.
        flip_probability: horizontal flip.
        color_probability: colour augmentation with this probability: on the 0–255 scale,
            image ** U(gamma_range) × U(brightness_range) × U(color_range) per channel, clipped.
        test_flip: average the prediction with that of the flipped image, flipped back.
    """

    task: ClassVar[str] = "depth"
    crop_size: tuple[int, int] = (416, 544)
    nyu_crop: bool = False
    kb_crop: tuple[int, int] | None = None
    rotate_probability: float = 0.5
    rotate_degrees: float = 2.5
    flip_probability: float = 0.5
    color_probability: float = 0.5
    gamma_range: tuple[float, float] = (0.9, 1.1)
    brightness_range: tuple[float, float] = (0.75, 1.25)
    color_range: tuple[float, float] = (0.9, 1.1)
    test_flip: bool = True

    def _kb(self, *maps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, w = maps[0].shape[-2:]
        crop_h, crop_w = self.kb_crop
        if h < crop_h or w < crop_w:
            raise ValueError(f"KB crop {crop_h}x{crop_w} needs an image at least that large, got {h}x{w}")
        top, left = h - crop_h, (w - crop_w) // 2
        return tuple(m[..., top : top + crop_h, left : left + crop_w] for m in maps)

    def test_sample(self, image: torch.Tensor, depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The test image and ground truth: KB-cropped for KITTI, unchanged otherwise."""
        return self._kb(image, depth) if self.kb_crop else (image, depth)

    def train_sample(
        self, image: torch.Tensor, depth: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One augmented sample: image `[3, H, W]` in [0, 1] and depth `[H, W]` metres (0 = invalid)
        -> a crop of at most `crop_size` (padding when batching: image 0 after normalisation, depth 0)."""
        if self.nyu_crop:
            image, depth = image[:, 45:472, 43:608], depth[45:472, 43:608]
        if self.kb_crop:
            image, depth = self._kb(image, depth)
        image = image * 255
        rotating, degrees = (
            _coin(self.rotate_probability, generator),
            _uniform(-self.rotate_degrees, self.rotate_degrees, generator),
        )
        if rotating:
            image, depth = rotate(image, depth, degrees)
        if _coin(self.flip_probability, generator):
            image, depth = image.flip(-1), depth.flip(-1)
        box = _random_crop_box(*image.shape[-2:], self.crop_size, generator)
        image, depth = image[:, box[0] : box[1], box[2] : box[3]], depth[box[0] : box[1], box[2] : box[3]]
        if _coin(self.color_probability, generator):
            gamma, brightness = _uniform(*self.gamma_range, generator), _uniform(*self.brightness_range, generator)
            colors = torch.tensor([_uniform(*self.color_range, generator) for _ in range(3)])
            # as the toolbox: the gamma acts on 0–255 values, so it also changes brightness strongly
            image = (image**gamma * brightness * colors[:, None, None]).clamp(0, 255)
        return image / 255, depth


Pipeline = SegmentationPipeline | DepthPipeline

# dataset -> task -> its official pipeline
_SEG = SegmentationPipeline()
_INDOOR_DEPTH = DepthPipeline(crop_size=(416, 544))
PAPER_PIPELINES: dict[str, dict[str, Pipeline]] = {
    "scannetpp": {"segmentation": _SEG, "depth": _INDOOR_DEPTH},
    "scannet": {"segmentation": _SEG, "depth": _INDOOR_DEPTH},
    "nyuv2": {"segmentation": _SEG, "depth": DepthPipeline(crop_size=(416, 544), nyu_crop=True)},
    "ade20k": {"segmentation": _SEG},
    "voc2012": {"segmentation": _SEG},
    "kitti": {"depth": DepthPipeline(crop_size=(352, 704), kb_crop=(352, 1216), brightness_range=(0.9, 1.1))},
}


def pad_batch(
    samples: list[tuple[torch.Tensor, torch.Tensor]], size: tuple[int, int], fill: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack (image `[3, h, w]`, target `[h, w]`) samples padded at the bottom/right to `size`.

    Returns images `[B, 3, H, W]`, `valid` `[B, 1, H, W]` (False on padding: the features
    normalise and then zero it, as mmseg pads after Normalize) and targets `[B, H, W]` (`fill` on
    padding: 255 for labels, 0 for depth).
    """
    height = max(size[0], *(image.shape[-2] for image, _ in samples))
    width = max(size[1], *(image.shape[-1] for image, _ in samples))
    images = torch.zeros(len(samples), 3, height, width)
    valid = torch.zeros(len(samples), 1, height, width, dtype=torch.bool)
    targets = torch.full((len(samples), height, width), fill, dtype=samples[0][1].dtype)
    for i, (image, target) in enumerate(samples):
        h, w = image.shape[-2:]
        images[i, :, :h, :w], valid[i, :, :h, :w], targets[i, :h, :w] = image, True, target
    return images, valid, targets
