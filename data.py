"""Datasets: every one yields (image in [-1, 1] as float CHW, label)."""
import os

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets, transforms

# name -> (default random horizontal flip, image channels, native size or None)
DATASETS = {
    "cifar10": (True, 3, 32),
    "digits": (False, 1, 8),
    "lsun_church": (True, 3, None),
    "lsun_bedroom": (False, 3, None),
    "lsun_cat": (False, 3, None),
    "celebahq": (True, 3, None),
    "folder": (True, 3, None),
}
LSUN_CLASSES = {"lsun_church": "church_outdoor", "lsun_bedroom": "bedroom", "lsun_cat": "cat"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DIGITS_HELD_OUT = 297  # 1797 digits: 1500 to train on, 297 held out for scoring


class DatasetError(RuntimeError):
    """A dataset that is missing or malformed; the message says what to do."""


def check_dataset_name(name):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")


def default_flip(name):
    return DATASETS[name][0]


def to_signed_unit(x):
    """[0, 1] -> [-1, 1], the scale the model sees (official: x / 127.5 - 1)."""
    return x * 2.0 - 1.0


def image_transform(img_size, flip, channels, crop=True):
    steps = [transforms.Resize(img_size)]
    if crop:
        steps.append(transforms.CenterCrop(img_size))
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    if channels == 1:
        steps.append(transforms.Grayscale(1))
    steps += [transforms.ToTensor(), transforms.Lambda(to_signed_unit)]
    return transforms.Compose(steps)


def cifar10(root, img_size, flip, train):
    steps = [transforms.Resize(img_size)] if img_size != 32 else []
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    transform = transforms.Compose(steps + [transforms.ToTensor(), transforms.Lambda(to_signed_unit)])
    extracted = os.path.join(root, "cifar-10-batches-py")
    try:
        return datasets.CIFAR10(root, train=train, download=not os.path.isdir(extracted),
                                transform=transform)
    except Exception as error:  # no network, a truncated archive, ...
        raise DatasetError(
            f"CIFAR10 is not in {extracted} and could not be downloaded ({error}); download "
            f"cifar-10-python.tar.gz and extract it so that {extracted}/data_batch_1 exists") from None


def digits_array(train):
    """scikit-learn's 1797 8x8 handwritten digits (shipped with the package), in [0, 1].

    A fixed permutation holds the last DIGITS_HELD_OUT images out of the training split.
    """
    from sklearn.datasets import load_digits
    bunch = load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.target))
    order = order[:-DIGITS_HELD_OUT] if train else order[-DIGITS_HELD_OUT:]
    # stored as 8-bit images, like every other dataset (and the bits/dim decoder's bins)
    images = np.round(bunch.images[order] / 16.0 * 255.0).astype(np.float32) / 255.0
    return images[:, None], bunch.target[order]


class TransformedTensors(Dataset):
    """In-memory images in [0, 1] with an optional resize and random flip."""

    def __init__(self, images, labels, img_size, flip):
        self.images = torch.from_numpy(images)
        self.labels = torch.from_numpy(labels)
        self.img_size = img_size
        self.flip = flip

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        x = self.images[index]
        if x.shape[-1] != self.img_size:
            x = torch.nn.functional.interpolate(
                x[None], size=(self.img_size, self.img_size), mode="bilinear",
                align_corners=False, antialias=True)[0]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return to_signed_unit(x), self.labels[index]


class ImageFiles(Dataset):
    """Every image file under a folder (recursively), center-cropped and resized."""

    def __init__(self, root, transform):
        self.paths = sorted(
            os.path.join(folder, name)
            for folder, _, names in os.walk(root) for name in names
            if name.lower().endswith(IMAGE_EXTENSIONS))
        if not self.paths:
            raise DatasetError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        from PIL import Image
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), 0


def lsun(name, root, img_size, flip, train, channels):
    try:
        import lmdb  # noqa: F401  (torchvision's LSUN reader needs it)
    except ImportError:
        raise DatasetError(f"{name} reads LSUN's lmdb databases: pip install lmdb") from None
    category = f"{LSUN_CLASSES[name]}_{'train' if train else 'val'}"
    if not os.path.isdir(os.path.join(root, f"{category}_lmdb")):
        raise DatasetError(f"{name}: expected the LSUN database {os.path.join(root, category + '_lmdb')}")
    return datasets.LSUN(root, classes=[category], transform=image_transform(img_size, flip, channels))


def build_dataset(name, root, img_size, train=True, flip=None, channels=None):
    """The named dataset at img_size, scaled to [-1, 1]; flip and channels default per dataset."""
    check_dataset_name(name)
    default_flip_, default_channels, _ = DATASETS[name]
    flip = default_flip_ if flip is None else flip
    channels = default_channels if channels is None else channels
    if name in ("cifar10", "digits") and channels != default_channels:
        raise DatasetError(f"{name} images have {default_channels} channel(s): set --img_channels "
                           f"{default_channels}, not {channels}")
    if name == "cifar10":
        return cifar10(root, img_size, flip, train)
    if name == "digits":
        return TransformedTensors(*digits_array(train), img_size, flip)
    if name in LSUN_CLASSES:
        return lsun(name, root, img_size, flip, train, channels)
    if not os.path.isdir(root):
        raise DatasetError(f"{name}: data_root {root} is not a folder of images")
    return ImageFiles(root, image_transform(img_size, flip, channels))



def as_tensor(dataset):
    """The whole dataset as one tensor (uint8 0..255, or float in [-1, 1]) for holding on
    the GPU, or None when it is not already in memory at its training size."""
    if isinstance(dataset, datasets.CIFAR10) and not dataset.transform.transforms[:-2]:
        return torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    if isinstance(dataset, TransformedTensors) and dataset.images.shape[-1] == dataset.img_size:
        return to_signed_unit(dataset.images)
    return None


def from_stored(images):
    """A batch of as_tensor's images as float in [-1, 1]."""
    return images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images
