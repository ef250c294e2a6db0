"""Datasets: every one yields (image in [-1, 1] as float CHW, label)."""
import hashlib
import io
import os
import sys

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms
from tqdm import tqdm

import distributed
import files
from errors import UserError

# name -> (default random horizontal flip, image channels, native size or None, its number of
# classes: "folder" for one per class subfolder, None for a dataset without labels)
DATASETS = {
    "cifar10": (True, 3, 32, 10),
    "digits": (False, 1, 8, 10),
    "lsun_church": (True, 3, None, None),
    "lsun_bedroom": (False, 3, None, None),
    "lsun_cat": (False, 3, None, None),
    "celebahq": (True, 3, None, None),
    "folder": (True, 3, None, "folder"),
}
LSUN_CLASSES = {"lsun_church": "church_outdoor", "lsun_bedroom": "bedroom", "lsun_cat": "cat"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DIGITS_HELD_OUT = 297  # 1797 digits: 1500 to train on, 297 held out for scoring
DIGIT_CLASSES = [str(digit) for digit in range(10)]
BALANCE_SHOWN = 20  # class_balance lists each class's count up to this many classes


class DatasetError(UserError, RuntimeError):
    """A dataset that is missing or malformed; the message says what to do."""


def check_dataset_name(name):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")


def default_flip(name):
    return DATASETS[name][0]


def to_signed_unit(x):
    """[0, 1] -> [-1, 1], the scale the model sees (official: x / 127.5 - 1)."""
    return x * 2.0 - 1.0


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_8_bits(image):
    """A PIL image whose 8-bit conversion PIL does not scale, as 8-bit grayscale: 16-bit
    grayscale (a 16-bit PNG; PIL's own conversion clips it at 255, saturating almost every
    pixel) scaled by 255 / 65535 and rounded. 32-bit integer and float pixels have no
    known range: ValueError. Other modes pass unchanged (16-bit RGB PNGs PIL already reads as
    8-bit RGB)."""
    if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG"):
        pixels = np.asarray(image).astype(np.float64)  # a 16-bit PNG opens as "I" in some PIL versions
        return Image.fromarray(np.rint(pixels * (255.0 / 65535.0)).astype(np.uint8), mode="L")
    if image.mode in ("I", "F"):
        kind = "32-bit integer" if image.mode == "I" else "floating-point"
        raise ValueError(f"its pixels are {kind} (PIL mode {image.mode}), whose range is unknown: "
                         "save it with 8 or 16 bits per channel")
    return image


def prepare_image(image, img_size, channels):
    """A PIL image as the official code prepared LSUN (StyleGAN2's dataset tool): its centred
    square, offsets rounded down, resized to img_size with PIL's Lanczos filter (antialiased);
    uint8 (channels, img_size, img_size)."""
    image = to_8_bits(image)
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.convert("RGB").crop((left, top, left + side, top + side))
    image = image.resize((img_size, img_size), Image.Resampling.LANCZOS)
    return transforms.functional.pil_to_tensor(image.convert("L") if channels == 1 else image)


def to_model_input(pixels, flip):
    """uint8 (C, H, W) -> float in [-1, 1], mirrored with probability 1/2 when flip; the same
    numbers as the images held on the device give (from_stored)."""
    if flip and torch.rand(()) < 0.5:
        pixels = pixels.flip(-1)
    return from_stored(pixels)


def image_transform(img_size, flip, channels):
    """PIL image -> the model's input: prepare_image, then to_model_input."""
    return lambda image: to_model_input(prepare_image(image, img_size, channels), flip)


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
    """In-memory images in [0, 1] with an optional resize and random flip, and their labels:
    indices into classes, the class names."""

    def __init__(self, images, labels, img_size, flip, classes):
        self.images = torch.from_numpy(images)
        self.labels = torch.from_numpy(labels)
        self.classes = classes
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


class EncodedImages(Dataset):
    """Images stored encoded (JPEG, PNG, WebP, ...), decoded one at a time by prepare_image.
    A subclass says where image i is: source(i) -> (its name for errors, a path or file)."""

    def __init__(self, img_size, flip, channels):
        self.img_size, self.flip, self.channels = img_size, flip, channels

    def pixels(self, index):
        """Image `index` at the training size, uint8 (C, H, W), never flipped."""
        name, source = self.source(index)
        try:
            with Image.open(source) as image:
                return prepare_image(image, self.img_size, self.channels)
        # not an image, truncated (OSError); a broken PNG chunk (SyntaxError)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            # PIL would name a database entry by the address of its in-memory file
            reason = ("not an image format PIL reads" if isinstance(error, Image.UnidentifiedImageError)
                      else error)
            raise DatasetError(f"cannot read image {name}: {reason}") from None

    def __getitem__(self, index):
        return to_model_input(self.pixels(index), self.flip), 0


def is_image_file(path):
    # regular files only: a FIFO or device named x.png would block or never end a read
    return path.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(path)


def image_files(root):
    """Every image file under a folder (recursively), in sorted order."""
    return sorted(path for folder, _, names in os.walk(root) for name in names
                  if is_image_file(path := os.path.join(folder, name)))


def named(names, shown=5):
    """The first `shown` of some names, and how many more there are, for a one-line message."""
    more = f" and {len(names) - shown:,} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


class ImagePaths(EncodedImages):
    """Image files at the given paths, in their order."""

    def __init__(self, paths, img_size, flip, channels):
        super().__init__(img_size, flip, channels)
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def source(self, index):
        return self.paths[index], self.paths[index]


class ImageFiles(ImagePaths):
    """Every image file under a folder (recursively), in sorted order, each labelled 0."""

    def __init__(self, root, img_size, flip, channels):
        super().__init__(image_files(root), img_size, flip, channels)
        if not self.paths:
            raise DatasetError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")


class ClassFolders(ImagePaths):
    """A folder of one subfolder per class, labelled as torchvision's ImageFolder labels it:
    class i is the i-th subfolder name in sorted order, and holds every image file found in it
    (recursively). The images run class by class, each class's in sorted order; targets holds
    their labels."""

    def __init__(self, root, img_size, flip, channels):
        self.root = root
        self.classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        per_class = [image_files(os.path.join(root, name)) for name in self.classes]
        if not any(per_class):
            raise DatasetError(f"--num_classes needs one subfolder per class under {root}; found none")
        loose = sorted(name for name in os.listdir(root) if is_image_file(os.path.join(root, name)))
        if loose:
            raise DatasetError(f"{len(loose):,} image(s) lie directly in {root}, in no class subfolder "
                               f"({named(loose)}): with --num_classes, move each into its class's subfolder")
        empty = [name for name, paths in zip(self.classes, per_class) if not paths]
        if empty:
            raise DatasetError(f"class subfolder(s) of {root} without image files "
                               f"({', '.join(IMAGE_EXTENSIONS)}): {named(empty)}; add images or remove them")
        super().__init__([path for paths in per_class for path in paths], img_size, flip, channels)
        self.targets = np.repeat(np.arange(len(per_class), dtype=np.int64), [len(paths) for paths in per_class])

    def __getitem__(self, index):
        return to_model_input(self.pixels(index), self.flip), int(self.targets[index])


LMDB_ENVS = {}  # real path -> environment: lmdb opens a database once per process


def open_lmdb(path):
    """The process's environment of the database at path, opened read-only without a lock
    file (it may sit on a read-only share). A loader worker forked from a process that has it
    open uses the inherited one: lmdb refuses to open it twice, and reading it is safe."""
    import lmdb
    real_path = os.path.realpath(path)
    if real_path not in LMDB_ENVS:
        try:
            env = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False)
        except lmdb.Error as error:
            raise DatasetError(f"{path} is not a readable lmdb database: {error}") from None
        check_not_truncated(path, env)
        LMDB_ENVS[real_path] = env
    return LMDB_ENVS[real_path]


def check_not_truncated(path, env):
    """lmdb maps the file into memory: reading a page past the end of a truncated data.mdb (an
    interrupted copy or download) kills the process with SIGBUS. The database's own page count
    says how long the file must be; check it before any page is read."""
    pages = env.info()["last_pgno"] + 1
    needed = pages * env.stat()["psize"]
    size = os.path.getsize(os.path.join(path, "data.mdb"))
    if size < needed:
        env.close()
        raise DatasetError(f"{path}/data.mdb is truncated: {size:,} bytes, where its {pages:,} pages "
                           f"need {needed:,}; copy or download the database again")


def key_cache_paths(db_path):
    """Where a database's key list is cached: next to it, else under the user's cache folder
    (XDG_CACHE_HOME or ~/.cache), named by the database's absolute path; never the working
    directory."""
    db_path = os.path.abspath(db_path).rstrip(os.sep)
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha1(db_path.encode()).hexdigest()[:16]
    paths = [db_path + ".keys.npz"]
    if os.path.isabs(cache_home):
        paths.append(os.path.join(cache_home, "ddpm", f"{os.path.basename(db_path)}-{digest}.keys.npz"))
    return paths


def read_key_cache(path, entries):
    """(blob, ends) from a cache file that lists `entries` keys, else None."""
    try:
        with files.open_regular(path) as file, np.load(file, allow_pickle=False) as cached:
            blob, ends = cached["blob"], cached["ends"]
    except (OSError, ValueError, KeyError):  # absent, unreadable, not a regular file, or not ours
        return None
    return (blob, ends) if len(ends) == entries else None


def write_key_cache(path, blob, ends):
    """Write to a file of this process, then rename: processes that build the list at the same
    time (torchrun's, on first use) each leave a whole file. False when it cannot be written."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        files.write_atomically(path, lambda file: np.savez(file, blob=blob, ends=ends), blob.nbytes + ends.nbytes)
        return True
    except (OSError, files.WriteError):
        return False


def lsun_keys(db_path, env):
    """Every key of an LSUN database, in its (sorted) order, as numpy arrays: key i is
    blob[ends[i - 1]:ends[i]]. Listing them reads the whole key index (bedroom: 3 million keys,
    minutes), so the list is built once and cached (key_cache_paths); a cache whose count
    differs from the database's is built afresh."""
    entries = env.stat()["entries"]
    paths = key_cache_paths(db_path)
    for path in paths:
        cached = read_key_cache(path, entries)
        if cached is not None:
            return cached
    with env.begin() as txn:
        keys = list(tqdm(txn.cursor().iternext(keys=True, values=False), total=entries,
                         desc=f"listing the keys of {os.path.basename(db_path)} (once)", unit="key"))
    blob = np.frombuffer(b"".join(keys), np.uint8)
    ends = np.cumsum([len(key) for key in keys], dtype=np.int64)
    if not any(write_key_cache(path, blob, ends) for path in paths):
        print(f"note: the key list of {db_path} could not be cached in {' or '.join(paths)}",
              file=sys.stderr)
    return blob, ends


class LsunDatabase(EncodedImages):
    """One LSUN category's lmdb: keys -> encoded images (JPEG or WebP, any size)."""

    def __init__(self, db_path, img_size, flip, channels):
        super().__init__(img_size, flip, channels)
        self.db_path = db_path
        self.blob, self.ends = lsun_keys(db_path, open_lmdb(db_path))
        if len(self.ends) == 0:
            raise DatasetError(f"the LSUN database {db_path} holds no images")

    def __len__(self):
        return len(self.ends)

    def source(self, index):
        key = self.blob[self.ends[index - 1] if index else 0:self.ends[index]].tobytes()
        with open_lmdb(self.db_path).begin() as txn:
            value = txn.get(key)
        key = key.decode(errors="replace")
        if value is None:
            raise DatasetError(f"{self.db_path} has no key {key}: the database changed since its key "
                               f"list was cached; delete {key_cache_paths(self.db_path)[0]}")
        return f"{key} (entry {index} of {self.db_path})", io.BytesIO(value)


def lsun(name, root, img_size, flip, train, channels):
    try:
        import lmdb  # noqa: F401
    except ImportError:
        raise DatasetError(f"{name} reads LSUN's lmdb databases: pip install lmdb") from None
    db_path = os.path.join(root, f"{LSUN_CLASSES[name]}_{'train' if train else 'val'}_lmdb")
    if not os.path.isdir(db_path):
        raise DatasetError(f"{name}: expected the LSUN database {db_path}")
    return LsunDatabase(db_path, img_size, flip, channels)


def build_dataset(name, root, img_size, train=True, flip=None, channels=None, labels=False):
    """The named dataset at img_size, scaled to [-1, 1]; flip and channels default per dataset.
    labels: a folder's images labelled by their class subfolders (ClassFolders), not all 0 (the
    other datasets' labels do not depend on it)."""
    check_dataset_name(name)
    default_flip_, default_channels, _, _ = DATASETS[name]
    flip = default_flip_ if flip is None else flip
    channels = default_channels if channels is None else channels
    if name in ("cifar10", "digits") and channels != default_channels:
        raise DatasetError(f"{name} images have {default_channels} channel(s): set --img_channels "
                           f"{default_channels}, not {channels}")
    if name == "cifar10":
        return cifar10(root, img_size, flip, train)
    if name == "digits":
        return TransformedTensors(*digits_array(train), img_size, flip, DIGIT_CLASSES)
    if name in LSUN_CLASSES:
        return lsun(name, root, img_size, flip, train, channels)
    if not os.path.isdir(root):
        raise DatasetError(f"{name}: data_root {root} is not a folder of images")
    if name == "folder" and labels:
        return ClassFolders(root, img_size, flip, channels)
    return ImageFiles(root, img_size, flip, channels)


def configured(data, model, train=True, flip=None):
    """The dataset of a DataConfig at a ModelConfig's image size and channels; for a
    class-conditional model, labelled by class, with the model's number of classes
    (check_classes)."""
    dataset = build_dataset(data.dataset, data.data_root, model.img_size, train=train, flip=flip,
                            channels=model.img_channels, labels=model.num_classes > 0)
    if model.num_classes:
        check_classes(dataset, model.num_classes)
    return dataset


def class_names(dataset):
    """The names of a labelled dataset's classes, label i's at i: CIFAR10's, the digits "0".."9",
    a folder's class subfolders. DatasetError for a dataset without classes."""
    if not isinstance(dataset, (datasets.CIFAR10, TransformedTensors, ClassFolders)):
        raise DatasetError("this dataset has no classes: cifar10, digits and folders of one subfolder "
                           "per class (--num_classes) do")
    return list(dataset.classes)


def check_classes(dataset, num_classes):
    """DatasetError unless the dataset has num_classes classes."""
    names = class_names(dataset)
    if len(names) != num_classes:
        where = f", the subfolders of {dataset.root}" if isinstance(dataset, ClassFolders) else ""
        raise DatasetError(f"--num_classes {num_classes} does not match the data's {len(names):,} "
                           f"classes{where}: {named(names)}")


def labels_of(dataset):
    """Every image's label in the dataset's order, as a numpy int64 array, read without decoding
    any image: 0 for each image of a dataset without classes (the label it yields)."""
    if isinstance(dataset, TransformedTensors):
        return dataset.labels.numpy().astype(np.int64)
    if isinstance(dataset, (datasets.CIFAR10, ClassFolders)):
        return np.asarray(dataset.targets, dtype=np.int64)
    return np.zeros(len(dataset), dtype=np.int64)


def class_balance(labels, names):
    """How many images each class has, in one line: every count up to BALANCE_SHOWN classes,
    beyond that the range and which classes are its ends."""
    counts = np.bincount(labels, minlength=len(names))
    lowest, highest = counts.min(), counts.max()
    if len(names) <= BALANCE_SHOWN:
        each = ", ".join(f"{name} {count:,}" for name, count in zip(names, counts))
        return f"{len(names)} classes: {each} (min {lowest:,}, max {highest:,})"
    return (f"{len(names):,} classes of {counts.sum():,} images: {lowest:,} to {highest:,} per class "
            f"(fewest: {names[counts.argmin()]}, most: {names[counts.argmax()]}; median {np.median(counts):g})")


def worker_error(error):
    """A DatasetError raised in a loader worker arrives with the worker's traceback in its
    message: the error with its one line again."""
    return DatasetError(str(error).strip().splitlines()[-1].split("DatasetError: ")[-1])


def free_memory(device):
    """Bytes free on the device: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class Pixels(Dataset):
    """The uint8 images of an EncodedImages, for decoding them all through a DataLoader."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images.pixels(index)


def decode_all(dataset, device, num_workers):
    """Every image of an EncodedImages, decoded once into one uint8 tensor on the device,
    batch by batch, so that the host never holds the whole dataset."""
    shape = (len(dataset), dataset.channels, dataset.img_size, dataset.img_size)
    size, free = int(np.prod(shape)), free_memory(device)
    if size > free // 2:  # the other half: the model, its activations, Adam, the samplers
        raise DatasetError(
            f"--data_on_device: {shape[0]:,} images of {shape[2]}x{shape[3]} take {size / 2 ** 30:.1f} "
            f"GiB as uint8, more than half of the {free / 2 ** 30:.1f} GiB free on {device}; train "
            "with --nodata_on_device (the loader decodes them as it goes)")
    stored = torch.empty(shape, dtype=torch.uint8, device=device)
    loader = DataLoader(Pixels(dataset), batch_size=64, num_workers=num_workers)
    first = 0
    try:
        for batch in tqdm(loader, desc=f"decoding {shape[0]:,} images onto {device}", unit="batch",
                          disable=not distributed.is_main()):
            stored[first:first + len(batch)] = batch.to(device)
            first += len(batch)
    except DatasetError as error:
        raise worker_error(error) from None
    return stored


def as_tensor(dataset, device="cpu", decode=False, num_workers=0):
    """The whole dataset as one tensor on the device (uint8 0..255, or float in [-1, 1]) to
    train without a loader, or None when it is not held so.

    CIFAR10 (at 32x32) and the digits are in memory already. Encoded images (folders,
    CelebA-HQ, LSUN) only with decode: each is decoded once at the training size, a pass over
    the whole dataset at every start, and all must fit in half the device's free memory.
    """
    device = torch.device(device)
    if isinstance(dataset, datasets.CIFAR10) and not dataset.transform.transforms[:-2]:
        return torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous().to(device)
    if isinstance(dataset, TransformedTensors) and dataset.images.shape[-1] == dataset.img_size:
        return to_signed_unit(dataset.images).to(device)
    if isinstance(dataset, EncodedImages) and decode:
        return decode_all(dataset, device, num_workers)
    return None


def from_stored(images):
    """A batch of as_tensor's images as float in [-1, 1]."""
    return images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images
