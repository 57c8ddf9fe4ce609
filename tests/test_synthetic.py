"""Synthetic data generator and third-tower pretraining."""
import hashlib
import io
import json
import os
import re
import tarfile

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.datasets import ImageFolder

from open_clip_3t.toy import synthetic
from open_clip_3t.toy.pretrain import (Task, accuracies, create_model, load_labelled_set, preprocess,
                                      pretrain_third_tower, task_targets)
from open_clip_3t.toy.synthetic import ATTRIBUTES, draw_sample, write_classification_folder, write_labelled_set, write_shards


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_shards(paths):
    """{key: {ext: bytes}} over all members of the shards."""
    samples = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_shards_are_deterministic(tmp_path):
    a = write_shards(tmp_path / "a", 8, samples_per_shard=3, seed=0)
    b = write_shards(tmp_path / "b", 8, samples_per_shard=3, seed=0)
    c = write_shards(tmp_path / "c", 8, samples_per_shard=3, seed=1)
    assert [os.path.basename(p) for p in a] == ["00000.tar", "00001.tar", "00002.tar"]
    assert [sha256(p) for p in a] == [sha256(p) for p in b]
    assert all(sha256(p) != sha256(q) for p, q in zip(a, c))
    assert not list((tmp_path / "a").glob("*.tmp"))


def test_sample_does_not_depend_on_shard_size(tmp_path):
    three = read_shards(write_shards(tmp_path / "three", 8, samples_per_shard=3))
    five = read_shards(write_shards(tmp_path / "five", 8, samples_per_shard=5))
    assert sorted(three) == [f"{i:09d}" for i in range(8)]
    assert three == five
    offset = read_shards(write_shards(tmp_path / "offset", 3, samples_per_shard=2, start_index=5))
    assert offset == {k: three[k] for k in ["000000005", "000000006", "000000007"]}


def test_splits_use_disjoint_streams():
    for i in range(5):
        images = [np.asarray(draw_sample(i, 0, split)[0]) for split in synthetic.SPLITS]
        assert len({im.tobytes() for im in images}) == len(images)


def test_shard_layout_and_captions_name_attributes(tmp_path):
    paths = write_shards(tmp_path, 60, samples_per_shard=25, seed=3)
    samples = read_shards(paths)
    assert len(samples) == 60
    with open(tmp_path / "sizes.json") as f:
        sizes = json.load(f)
    for path in paths:
        with tarfile.open(path) as tar:
            assert sizes[os.path.basename(path)] * 3 == len(tar.getmembers())
    assert sum(sizes.values()) == 60 and sorted(sizes) == ["00000.tar", "00001.tar", "00002.tar"]

    word_orders, seen = set(), {name: set() for name in ATTRIBUTES}
    for key, members in samples.items():
        assert sorted(members) == ["jpg", "json", "txt"]
        meta = json.loads(members["json"])
        caption = members["txt"].decode()
        image = Image.open(io.BytesIO(members["jpg"]))
        assert meta["key"] == key and meta["caption"] == caption
        assert (meta["width"], meta["height"]) == image.size == (64, 64) and image.mode == "RGB"
        positions = {}
        for name, value in meta["attributes"].items():
            assert value in ATTRIBUTES[name]
            seen[name].add(value)
            match = re.search(rf"\b{value}(s|es)?\b", caption)
            assert match, f"{name}={value} missing from {caption!r}"
            positions[name] = match.start()
        word_orders.add(tuple(sorted(positions, key=positions.get)))
    assert len(word_orders) >= 3
    assert all(len(seen[name]) >= 2 for name in ATTRIBUTES)


def test_classification_folder(tmp_path):
    write_classification_folder(tmp_path, "colour", num_per_class=3, seed=5)
    classnames = (tmp_path / "classnames.txt").read_text().splitlines()
    templates = (tmp_path / "templates.txt").read_text().splitlines()
    assert classnames == ATTRIBUTES["colour"]
    assert templates and all("{}" in t for t in templates)
    folder = ImageFolder(str(tmp_path))
    assert [c.split("_", 1)[1] for c in folder.classes] == classnames
    assert np.bincount(folder.targets).tolist() == [3] * len(classnames)
    shapes = set()
    for path, target in folder.samples:
        index = int(os.path.splitext(os.path.basename(path))[0])
        image, attrs, _ = draw_sample(index, 5, "test")
        assert attrs["colour"] == classnames[target]
        shapes.add(attrs["shape"])
        decoded = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
        assert np.abs(decoded - np.asarray(image, dtype=np.int16)).mean() < 4  # JPEG of the same image
    assert len(shapes) >= 3  # other attributes vary


def test_clip_benchmark_layout_holds_the_same_samples(tmp_path):
    """--format clip_benchmark: CLIP_benchmark's webdataset layout, with the bytes of our folder and shards."""
    folder = write_classification_folder(str(tmp_path / "folder"), "shape", num_per_class=2, seed=3)
    synthetic.main(["classification", "--out", str(tmp_path / "cb_shape"), "--attribute", "shape", "--num-per-class",
                    "2", "--seed", "3", "--format", "clip_benchmark"])
    cb = tmp_path / "cb_shape"
    assert (cb / "test" / "nshards.txt").read_text() == "1\n" and not (cb / "dataset_type.txt").exists()
    assert (cb / "classnames.txt").read_text().splitlines() == ATTRIBUTES["shape"]
    assert (cb / "zeroshot_classification_templates.txt").read_text().splitlines() == [
        t.replace("{}", "{c}") for t in (tmp_path / "folder" / "templates.txt").read_text().splitlines()]
    samples = read_shards([cb / "test" / "0.tar"])
    in_folder = {os.path.splitext(os.path.basename(p))[0]: (p, t) for p, t in ImageFolder(folder).samples}
    assert sorted(samples) == sorted(in_folder) and len(samples) == 2 * len(ATTRIBUTES["shape"])
    for key, members in samples.items():
        path, target = in_folder[key]
        assert set(members) == {"jpg", "cls"} and int(members["cls"]) == target
        assert members["jpg"] == open(path, "rb").read()

    synthetic.main(["shards", "--out", str(tmp_path / "cb_val"), "--num-samples", "7", "--samples-per-shard", "3",
                    "--split", "val", "--seed", "3", "--format", "clip_benchmark"])
    cb = tmp_path / "cb_val"
    assert (cb / "dataset_type.txt").read_text() == "retrieval\n" and (cb / "test" / "nshards.txt").read_text() == "3\n"
    pairs = read_shards([cb / "test" / f"{i}.tar" for i in range(3)])
    laion = read_shards(write_shards(tmp_path / "val", 7, samples_per_shard=3, seed=3, split="val"))
    assert pairs == {key: {"jpg": m["jpg"], "txt": m["txt"]} for key, m in laion.items()}


def test_unknown_attribute_is_rejected_before_any_work(tmp_path, capsys):
    with pytest.raises(ValueError, match="flavour.*shape, colour"):
        write_classification_folder(tmp_path / "cls", "flavour", 2, seed=0)
    with pytest.raises(ValueError, match="flavour"):
        write_labelled_set(tmp_path / "lab", ["shape", "flavour"], 10, seed=0)
    with pytest.raises(ValueError, match="split 'holdout'"):
        write_shards(tmp_path / "shards", 10, split="holdout")
    with pytest.raises(ValueError, match="flavour"):
        synthetic.write_clip_benchmark_classification(tmp_path / "cb", "flavour", 2, seed=0)
    with pytest.raises(ValueError, match="split 'holdout'"):
        synthetic.write_clip_benchmark_retrieval(tmp_path / "cb", 10, split="holdout")
    assert not any(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        synthetic.main(["classification", "--out", str(tmp_path / "cli"), "--attribute", "flavour", "--num-per-class", "2"])
    assert "flavour" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_labelled_set(tmp_path):
    write_labelled_set(tmp_path, ["shape", "size"], 40, seed=2, image_size=32)
    images, labels, class_names, attributes = load_labelled_set(str(tmp_path))
    assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8
    assert attributes == ["shape", "size"] and len(class_names) == 7 * 2
    for i in (0, 17, 39):
        image, attrs, _ = draw_sample(i, 2, "pretrain", 32)
        assert np.array_equal(images[i], np.asarray(image))
        assert class_names[labels[i]] == f"{attrs['shape']} {attrs['size']}"


def test_any_attribute_subset_is_a_task(tmp_path):
    write_labelled_set(tmp_path, ["shape", "colour", "size"], 30, seed=1, image_size=32)
    _, labels, _, attributes = load_labelled_set(str(tmp_path))
    targets = task_targets(labels, attributes, ["size", "shape"])
    for i in (0, 11, 29):
        attrs = draw_sample(i, 1, "pretrain", 32)[1]
        assert targets[i].tolist() == [ATTRIBUTES["size"].index(attrs["size"]), ATTRIBUTES["shape"].index(attrs["shape"])]
    with pytest.raises(ValueError, match=r"\['count'\] are not labelled in this set"):
        task_targets(labels, attributes, ["count"])


def test_task_outputs_loss_and_accuracies_by_hand():
    y = torch.tensor([[1, 0], [6, 1], [2, 1]])  # (shape, size) value indices
    product, multi = Task(["shape", "size"], False), Task(["shape", "size"], True)
    assert product.num_outputs == 14 and product.output_names[1:4] == ["circle large", "square small", "square large"] and multi.num_outputs == 9
    assert multi.output_names[7:] == ["size=small", "size=large"]
    assert product.flat(y).tolist() == [2, 13, 5]                  # shape * 2 + size
    assert product.predict(F.one_hot(product.flat(y), 14).float()).tolist() == y.tolist()
    logits = torch.randn(3, 9)
    expected = (F.cross_entropy(logits[:, :7], y[:, 0]) + F.cross_entropy(logits[:, 7:], y[:, 1])) / 2
    torch.testing.assert_close(multi.loss(logits, y), expected)
    logits = torch.zeros(3, 9)
    logits[0, 1] = logits[0, 7] = 1   # both right
    logits[1, 6] = logits[1, 7] = 1   # shape right, size wrong
    logits[2, 3] = logits[2, 8] = 1   # shape wrong, size right
    exact, per_attribute = accuracies(torch.nn.Identity(), multi, logits, y)
    assert exact == pytest.approx(1 / 3) and per_attribute == pytest.approx({"shape": 2 / 3, "size": 2 / 3})


def test_multitask_pretraining_on_a_subset(tmp_path):
    write_labelled_set(tmp_path, ["colour", "size", "count"], 500, seed=0, image_size=32)
    summary = pretrain_third_tower(str(tmp_path), str(tmp_path / "h.pth"), "test_vit", image_size=32, epochs=4,
                                   progress=False, attributes=["colour", "size"], multitask=True, num_samples=400)
    assert summary["num_samples"] == 400 and summary["num_classes"] == 8 + 2 and summary["multitask"]
    assert summary["class_names"][0] == "colour=red" and set(summary["heldout_accuracy_per_attribute"]) == {"colour", "size"}
    assert summary["heldout_accuracy_per_attribute"]["colour"] > 0.3  # chance 1/8
    assert summary["heldout_accuracy"] <= min(summary["heldout_accuracy_per_attribute"].values())
    assert torch.load(tmp_path / "h.pth")["head.weight"].shape == (10, 64)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tower")
    write_labelled_set(str(root), ["colour", "size"], 1500, seed=0, image_size=32)
    out_file = str(root / "tower.pth")
    summary = pretrain_third_tower(str(root), out_file, "test_vit", image_size=32, epochs=20, progress=False)
    return root, out_file, summary


def test_pretraining_beats_chance(pretrained):
    _, out_file, summary = pretrained
    assert summary["num_classes"] == 16 and summary["class_names"][0] == "red small"
    assert summary["heldout_accuracy"] > 0.6  # chance is 1/16; measured ~0.8
    with open(out_file + ".json") as f:
        assert json.load(f) == summary


def test_checkpoint_loads_as_timm_pretrained(pretrained):
    root, out_file, summary = pretrained
    state_dict = torch.load(out_file)
    assert state_dict["head.weight"].shape == (16, 64)
    trained = create_model("test_vit", summary["num_classes"], 32)
    trained.load_state_dict(state_dict)
    tower = timm.create_model("test_vit", pretrained=True, num_classes=0, img_size=32,
                              pretrained_cfg_overlay=dict(file=out_file))
    trained.eval(), tower.eval()
    x = preprocess(load_labelled_set(str(root))[0][:16], 32)
    with torch.no_grad():
        expected = trained.forward_head(trained.forward_features(x), pre_logits=True)
        got = tower(x)
    assert got.shape == (16, 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
