"""Meta-training task families, the paper-dataset loader, reparameterisation and the inner problem."""

import math

import datasets
import numpy as np
import pytest
import torch

from meta_training import data, inner
from meta_training.tasks import (
    FAMILIES,
    DatasetFamily,
    PermutedFamily,
    TeacherFamily,
    families_by_name,
    family,
    hf_family,
    sample_scales,
)

OFFLINE = ["digits", "permuted_digits", "patches", "teacher"]


def _draw(fam, seed: int, batches: int = 3):
    generator = torch.Generator().manual_seed(seed)
    task = fam.sample_task(generator)
    return task, [fam.sample_batch(task, generator, 64) for _ in range(batches)]


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_family_batches_have_celo_shapes_and_are_deterministic_from_the_seed(name):
    fam = family(name)
    task, batches = _draw(fam, seed=3)
    task_again, batches_again = _draw(fam, seed=3)
    _, other_batches = _draw(fam, seed=4)
    assert task.keys() == task_again.keys() and all(torch.equal(task[k], task_again[k]) for k in task)
    for (x, y), (x2, y2), (x3, _) in zip(batches, batches_again, other_batches):
        assert x.shape == (64, 64) and x.dtype == torch.float32 and torch.isfinite(x).all()
        assert y.shape == (64,) and y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < 10
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert not torch.equal(x, x3)
    assert not torch.equal(batches[0][0], batches[1][0]), "successive batches of one stream must differ"


def test_digits_family_is_the_80_percent_split_of_sklearn_digits_scaled_to_unit_range():
    fam = family("digits")
    train, held_out = data.split_index(1797, 0.8)
    assert len(fam.train) == len(train) == int(0.8 * 1797)
    assert sorted(torch.cat([train, held_out]).tolist()) == list(range(1797))
    assert torch.equal(fam.train.inputs, data.digits().inputs[train])
    assert float(fam.train.inputs.min()) == 0.0 and float(fam.train.inputs.max()) == 1.0


def test_permuted_digits_applies_one_pixel_and_one_label_permutation_per_task():
    fam = families_by_name(["permuted_digits"])[0]
    assert isinstance(fam, PermutedFamily)
    generator = torch.Generator().manual_seed(0)
    task = fam.sample_task(generator)
    assert sorted(task["pixels"].tolist()) == list(range(64)) and sorted(task["labels"].tolist()) == list(range(10))
    state = generator.get_state()
    x, y = fam.sample_batch(task, generator, 64)
    generator.set_state(state)
    base_x, base_y = fam.base.sample_batch({}, generator, 64)
    assert torch.equal(x, base_x[:, task["pixels"]]) and torch.equal(y, task["labels"][base_y])
    other = fam.sample_task(torch.Generator().manual_seed(1))
    assert not torch.equal(task["pixels"], other["pixels"])


def test_patch_labels_are_a_deterministic_10_way_kmeans_of_china_jpg():
    first = data.patch_clusters("china.jpg")
    data.patch_clusters.cache_clear()
    second = data.patch_clusters("china.jpg")
    assert torch.equal(first.labels, second.labels) and torch.equal(first.inputs, second.inputs)
    counts = torch.bincount(first.labels, minlength=10)
    assert counts.numel() == 10 and int(counts.min()) > 0.005 * len(first)
    # label order follows the brightness of the cluster: mean patch brightness grows with the label
    means = torch.stack([first.inputs[first.labels == k].mean() for k in range(10)])
    assert torch.all(means[1:] > means[:-1])


def test_teacher_family_labels_are_the_teachers_argmax_up_to_5_percent_noise():
    fam = TeacherFamily()
    generator = torch.Generator().manual_seed(0)
    task = fam.sample_task(generator)
    x, y = fam.sample_batch(task, generator, 20_000)
    clean = (torch.tanh(x @ task["w1"]) @ task["w2"]).argmax(1)
    disagreement = float((y != clean).float().mean())
    assert abs(disagreement - 0.05 * 0.9) < 0.01  # a noisy label is still right 1 time in 10
    assert int(torch.bincount(clean, minlength=10).min()) > 0.02 * 20_000  # no class is missing


def test_family_lookup_rejects_unknown_names_and_misplaced_paths():
    assert set(OFFLINE) < set(FAMILIES) and {"mnist", "fashion_mnist", "cifar10", "svhn"} < set(FAMILIES)
    with pytest.raises(ValueError, match="unknown task family 'imagenet'"):
        family("imagenet")
    with pytest.raises(ValueError, match="only applies"):
        family("digits", path="/somewhere")
    with pytest.raises(ValueError, match="not requested"):
        families_by_name(["digits"], paths={"mnist": "/somewhere"})


# ---- the paper's datasets through `datasets`, on a tiny local copy ---------------------------------


def _write_hub_parquet(root, images: np.ndarray, labels: list[int], image_column: str) -> str:
    """A dataset in the Hub's parquet layout (``data/train-00000-of-00001.parquet``)."""
    from PIL import Image

    features = datasets.Features({image_column: datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    ds = datasets.Dataset.from_dict(
        {image_column: [Image.fromarray(a) for a in images], "label": labels}, features=features
    )
    (root / "data").mkdir()
    ds.to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return str(root)


def test_hf_loader_resizes_mnist_layout_bilinearly_without_antialiasing(tmp_path):
    """28x28 grey images whose pixel value is (column)^2 / 4: a 28 -> 8 bilinear resize with
    half-pixel centres and no antialiasing samples column 3.5 j + 1.25, interpolating the two
    neighbours; an antialiasing filter would average several columns instead."""
    columns = np.arange(28, dtype=np.float64)
    image = np.tile(columns**2 / 4, (28, 1)).astype(np.uint8)
    images = np.stack([image] * 10)
    path = _write_hub_parquet(tmp_path, images, list(range(10)), image_column="image")
    fam = hf_family("mnist", path=path)
    assert isinstance(fam, DatasetFamily) and fam.train.inputs.shape == (8, 64)
    assert fam.train.labels.tolist() == list(range(8))  # the first 80%, in the dataset's order
    source = 3.5 * np.arange(8) + 1.25
    left = np.floor(source).astype(int)
    weight = source - left
    expected = torch.tensor((image[0, left] * (1 - weight) + image[0, left + 1] * weight) / 255)
    got = fam.train.inputs[0].view(8, 8).double()
    torch.testing.assert_close(got, expected.expand(8, 8), atol=1e-6, rtol=0)


def test_hf_loader_averages_colour_channels_after_resizing_cifar_layout(tmp_path):
    generator = np.random.default_rng(0)
    images = generator.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    path = _write_hub_parquet(tmp_path, images, [3, 1, 4, 1, 5], image_column="img")
    got = data.hf_image_dataset("cifar10", path=path)
    small = torch.nn.functional.interpolate(
        torch.tensor(images).permute(0, 3, 1, 2).double(), size=(8, 8), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(got.inputs.double(), (small / 255).mean(1).reshape(5, 64), atol=1e-6, rtol=0)
    assert got.labels.tolist() == [3, 1, 4, 1, 5]


def test_hf_loader_names_the_missing_columns(tmp_path):
    ds = datasets.Dataset.from_dict({"pixels": [[0.0] * 4], "label": [1]})
    (tmp_path / "data").mkdir()
    ds.to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match="needs an Image column"):
        data.hf_image_dataset("svhn", path=str(tmp_path))


# ---- reparameterisation and the inner problem -------------------------------------------------------


def test_reparameterisation_scales_per_level():
    shapes = inner.PARAM_SHAPES
    draw = lambda level, seed=0: sample_scales(shapes, level, torch.Generator().manual_seed(seed))  # noqa: E731
    for level in ("global", "tensor", "parameter"):
        scales = draw(level)
        assert {k: tuple(v.shape) for k, v in scales.items()} == shapes
        assert all(torch.equal(scales[k], draw(level)[k]) for k in shapes)
        assert all(1e-3 <= float(v.min()) and float(v.max()) <= 1e3 for v in scales.values())
    shared = {float(v.flatten()[0]) for v in draw("global").values()}
    assert len(shared) == 1 and all(v.unique().numel() == 1 for v in draw("global").values())
    per_tensor = draw("tensor")
    assert all(v.unique().numel() == 1 for v in per_tensor.values())
    assert len({float(v.flatten()[0]) for v in per_tensor.values()}) == len(shapes)
    assert draw("parameter")["w1"].unique().numel() == 64 * 32
    log_scales = torch.log10(draw("parameter", seed=1)["w1"])
    assert abs(float(log_scales.mean())) < 0.15 and abs(float(log_scales.std()) - 6 / math.sqrt(12)) < 0.1
    with pytest.raises(ValueError, match="level must be one of"):
        sample_scales(shapes, "layer", torch.Generator())


def test_reparameterised_mlp_computes_the_same_function_and_its_gradient_is_scaled_by_s():
    """The optimizer holds phi = theta0 / s: the loss at init is the plain model's, and
    d loss / d phi = s * d loss / d theta."""
    members = 3
    theta0 = inner.init_params(members, [torch.Generator().manual_seed(i) for i in range(members)])
    generator = torch.Generator().manual_seed(0)
    per_member = [sample_scales(inner.PARAM_SHAPES, "parameter", generator) for _ in range(members)]
    scales = {name: torch.stack([s[name] for s in per_member]) for name in inner.PARAM_SHAPES}
    ones = {name: torch.ones_like(value) for name, value in scales.items()}
    phi = {name: value / scales[name] for name, value in theta0.items()}
    fam = family("digits")
    generators = [torch.Generator().manual_seed(7) for _ in range(members)]
    x, y = map(torch.stack, zip(*(fam.sample_batch({}, g, 64) for g in generators)))
    assert x.shape == (members, 64, 64) and y.shape == (members, 64)
    plain_loss, plain_grads = inner.losses_and_grads(theta0, ones, x, y)
    loss, grads = inner.losses_and_grads(phi, scales, x, y)
    assert loss.shape == (members,)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert abs(float(plain_loss[0]) - math.log(10)) < 0.3  # a fresh classifier: loss near ln 10
    for name in inner.PARAM_SHAPES:
        torch.testing.assert_close(grads[name], plain_grads[name] * scales[name], rtol=2e-3, atol=1e-6)


def test_inner_init_is_a_truncated_normal_with_std_one_over_sqrt_fan_in_and_zero_biases():
    params = inner.init_params(1, [torch.Generator().manual_seed(0)])
    w1 = params["w1"][0]
    std = 64**-0.5
    assert float(w1.abs().max()) <= 2 * std
    # a normal truncated at 2 std has std 0.880 of the untruncated one
    assert abs(float(w1.std()) / std - 0.880) < 0.05
    assert not params["b1"].any() and not params["b2"].any()


def test_loss_normaliser_clips_to_one_and_a_half_log_classes_and_maps_non_finite_to_the_top():
    top = 1.5 * math.log(10)
    losses = torch.tensor([-0.5, 0.0, 1.2, 3.0, 7.0, float("nan"), float("inf"), -float("inf")])
    expected = torch.tensor([0.0, 0.0, 1.2, 3.0, top, top, top, top])
    torch.testing.assert_close(inner.normalise_loss(losses), expected)
    assert float(inner.normalise_loss(torch.tensor([9.0]), num_classes=2)) == pytest.approx(1.5 * math.log(2))
