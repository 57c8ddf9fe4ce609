"""Synthetic LAION-style data: procedurally drawn shapes with compositional captions.

Each image shows 1-3 identical shapes; every attribute (shape, colour, size, position, background,
count) is drawn uniformly and independently and named in the caption. A sample is a pure function of
(seed, split, index), so output is byte-identical across runs and independent of shard size, and the
splits use disjoint RNG streams, so held-out data really is held out.

    python -m open_clip_3t.toy.synthetic shards --out data/train --num-samples 10000 --samples-per-shard 1000
    python -m open_clip_3t.toy.synthetic classification --out data/shape_test --attribute shape --num-per-class 50
    python -m open_clip_3t.toy.synthetic labelled --out data/pretrain --attributes shape colour --num-samples 5000

`--format clip_benchmark` writes the same held-out samples in CLIP_benchmark's webdataset layout instead (its
`--dataset wds/NAME --dataset_root OUT`): `classification` as a zero-shot classification set, `shards` as a
retrieval set.
"""
import argparse
import io
import itertools
import json
import os
import tarfile

import numpy as np
from PIL import Image, ImageDraw

from ..files import write_atomic

ATTRIBUTES = {
    "shape": ["circle", "square", "triangle", "star", "cross", "diamond", "hexagon"],
    "colour": ["red", "orange", "yellow", "green", "blue", "purple", "white", "black"],
    "size": ["small", "large"],
    "position": ["left", "right", "top", "bottom", "center"],
    "background": ["plain", "striped", "dotted", "checkered"],
    "count": ["one", "two", "three"],
}
SPLITS = {"train": 0, "val": 1, "test": 2, "pretrain": 3}  # split -> RNG stream id

CAPTION_TEMPLATES = [
    "{count} {size} {colour} {shapes} {where} on a {background} background",
    "a {background} background with {count} {size} {colour} {shapes} {where}",
    "{where}, {count} {colour} {shapes}, {size}, over a {background} background",
    "a picture of {count} {size} {shapes} in {colour} {where}, {background} background",
    "{size} {colour} {shapes} {where}, {count} in total, on a {background} background",
    "{count} {shapes} ({colour}, {size}) drawn {where} of a {background} background",
]
CLASS_TEMPLATES = {
    "shape": ["a picture of a {}.", "a {} shape.", "a drawing of a {} on a background."],
    "colour": ["a {} shape.", "a picture of {} shapes.", "something {} on a background."],
    "size": ["a {} shape.", "a picture of {} shapes.", "{} objects on a background."],
    "position": ["a shape at the {} of the picture.", "objects in the {} of the image.", "something drawn at the {}."],
    "background": ["shapes on a {} background.", "a {} background.", "a picture with a {} background."],
    "count": ["{} shapes.", "a picture of {} objects.", "{} things on a background."],
}
LABELLED_FILE = "labelled.npz"
FORMATS = {"shards": ("webdataset", "clip_benchmark"), "classification": ("folder", "clip_benchmark")}

RGB = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 225, 30), "green": (40, 170, 50),
    "blue": (30, 70, 220), "purple": (140, 40, 180), "white": (245, 245, 245), "black": (15, 15, 15),
}
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
         "center": "in the center"}
CENTRES = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8), "center": (0.5, 0.5)}
RADIUS = {"small": 0.08, "large": 0.13}  # fraction of the image side
SUPERSAMPLE = 4  # draw at 4x and downsample, for anti-aliased edges
JPEG_QUALITY = 90


def _ring(n, radii, start=-90.0):
    angles = np.deg2rad(start + 360.0 * np.arange(n) / n)
    return list(zip(np.resize(radii, n) * np.cos(angles), np.resize(radii, n) * np.sin(angles)))


_A = 0.33  # half-width of a cross's arms
POLYGONS = {  # vertices of radius-1 shapes centred on the origin, y pointing down; circles are ellipses
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": _ring(3, [1.0]),
    "star": _ring(10, [1.0, 0.42]),
    "cross": [(-_A, -1), (_A, -1), (_A, -_A), (1, -_A), (1, _A), (_A, _A), (_A, 1), (-_A, 1), (-_A, _A), (-1, _A),
              (-1, -_A), (-_A, -_A)],
    "diamond": [(0, -1), (0.65, 0), (0, 1), (-0.65, 0)],
    "hexagon": _ring(6, [1.0], start=0.0),
}


def _check(name, value, valid):
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def _check_int(name, value, minimum=1):
    if not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _rng(index, seed, split):
    _check("split", split, SPLITS)
    return np.random.default_rng([seed, SPLITS[split], index])


def _draw_attributes(rng):
    return {name: values[rng.integers(len(values))] for name, values in ATTRIBUTES.items()}


def _caption(attrs, rng):
    shape, count = attrs["shape"], attrs["count"]
    shapes = shape if count == "one" else shape + ("es" if shape.endswith("s") else "s")
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return template.format(shapes=shapes, where=WHERE[attrs["position"]], **attrs)


def _background(kind, rng, side):
    """Grey background with a random-scale, random-phase texture, as an (side, side, 3) uint8 array."""
    lo = int(rng.integers(80, 140))
    hi = lo + int(rng.integers(40, 60))
    period = side // int(rng.integers(4, 8))
    half = period // 2
    y, x = np.mgrid[0:side, 0:side] + rng.integers(period, size=(2, 1, 1))
    if kind == "plain":
        mask = np.zeros((side, side), bool)
    elif kind == "striped":
        mask = ((x, y, x + y)[rng.integers(3)] // half) % 2 == 1
    elif kind == "dotted":
        mask = (x % period - half) ** 2 + (y % period - half) ** 2 < (0.22 * period) ** 2
    else:  # checkered
        mask = (x // half + y // half) % 2 == 1
    return np.repeat(np.where(mask, hi, lo).astype(np.uint8)[..., None], 3, axis=2)


def _render(attrs, rng, image_size):
    side = image_size * SUPERSAMPLE
    image = Image.fromarray(_background(attrs["background"], rng, side))
    draw = ImageDraw.Draw(image)
    count = ATTRIBUTES["count"].index(attrs["count"]) + 1
    r = RADIUS[attrs["size"]] * side
    cx, cy = (c * side for c in CENTRES[attrs["position"]])
    vertical = attrs["position"] in ("left", "right")  # a column on the sides, a row elsewhere
    colour = tuple(int(c) for c in np.clip(np.array(RGB[attrs["colour"]]) + rng.integers(-12, 13, size=3), 0, 255))
    for k in range(count):
        offset = (k - (count - 1) / 2) * 2.3 * r
        jx, jy = rng.uniform(-0.25, 0.25, size=2) * r
        x, y = cx + jx + (0 if vertical else offset), cy + jy + (offset if vertical else 0)
        if attrs["shape"] == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        else:
            draw.polygon([(x + r * px, y + r * py) for px, py in POLYGONS[attrs["shape"]]], fill=colour)
    return image.resize((image_size, image_size), Image.BOX)


def draw_sample(index, seed, split="train", image_size=64):
    """Sample `index` of (seed, split): (RGB PIL image, attribute dict, caption)."""
    rng = _rng(index, seed, split)
    attrs = _draw_attributes(rng)
    caption = _caption(attrs, rng)
    return _render(attrs, rng, image_size), attrs, caption


def _jpeg(image):
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def _add_member(tar, name, data):
    info = tarfile.TarInfo(name)  # mtime, uid, gid, names all default to 0 / "": reproducible bytes
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def _tar_writer(members):
    """A write_atomic writer of an uncompressed USTAR tar holding (name, bytes) `members`, with reproducible bytes."""
    def write(f):
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                _add_member(tar, name, data)
    return write


def write_shards(out_dir, num_samples, samples_per_shard=1000, seed=0, split="train", image_size=64, start_index=0):
    """Write samples start_index.. as LAION-style shards out_dir/00000.tar, ... plus sizes.json; return shard paths.

    Keys are the 9-digit global sample index, so sample i is identical whatever the shard size.
    """
    _check("split", split, SPLITS)
    for name, value in [("num_samples", num_samples), ("samples_per_shard", samples_per_shard), ("image_size", image_size)]:
        _check_int(name, value)
    _check_int("seed", seed, 0)
    _check_int("start_index", start_index, 0)
    os.makedirs(out_dir, exist_ok=True)
    end = start_index + num_samples
    paths, sizes = [], {}
    for shard, first in enumerate(range(start_index, end, samples_per_shard)):
        name = f"{shard:05d}.tar"
        path = os.path.join(out_dir, name)
        indices = range(first, min(first + samples_per_shard, end))
        members = []
        for i in indices:
            image, attrs, caption = draw_sample(i, seed, split, image_size)
            key = f"{i:09d}"
            meta = {"key": key, "caption": caption, "width": image.width, "height": image.height, "attributes": attrs}
            members += [(key + ".jpg", _jpeg(image)), (key + ".txt", caption.encode()),
                        (key + ".json", json.dumps(meta).encode())]
        write_atomic(path, _tar_writer(members))  # a killed run never leaves a short .tar
        paths.append(path)
        sizes[name] = len(indices)
    write_atomic(os.path.join(out_dir, "sizes.json"), json.dumps(sizes, indent=1).encode())
    return paths


def _class_samples(attribute, num_per_class, seed, split):
    """[(sample index, class index)]: the first num_per_class samples of each value of `attribute`, in index order."""
    _check("attribute", attribute, ATTRIBUTES)
    _check("split", split, SPLITS)
    _check_int("num_per_class", num_per_class)
    _check_int("seed", seed, 0)
    values, chosen = ATTRIBUTES[attribute], []
    filled = [0] * len(values)
    for index in itertools.count():
        label = values.index(_draw_attributes(_rng(index, seed, split))[attribute])
        if filled[label] < num_per_class:
            filled[label] += 1
            chosen.append((index, label))
            if min(filled) == num_per_class:
                return chosen


def write_classification_folder(out_dir, attribute, num_per_class, seed, split="test", image_size=64):
    """Write an ImageFolder out_dir/<NNN>_<value>/<index>.jpg with num_per_class images per value of `attribute`.

    Images are the split's samples in index order (all other attributes random), kept until every class
    is full; the file stem is the sample index, so draw_sample(index, seed, split) reproduces it.
    Also writes classnames.txt (in ATTRIBUTES order = ImageFolder class order) and templates.txt.
    """
    _check_int("image_size", image_size)
    chosen = _class_samples(attribute, num_per_class, seed, split)
    values = ATTRIBUTES[attribute]
    dirs = [os.path.join(out_dir, f"{i:03d}_{v}") for i, v in enumerate(values)]
    for index, label in chosen:
        os.makedirs(dirs[label], exist_ok=True)
        image = draw_sample(index, seed, split, image_size)[0]
        write_atomic(os.path.join(dirs[label], f"{index:09d}.jpg"), _jpeg(image))
    write_atomic(os.path.join(out_dir, "classnames.txt"), "".join(v + "\n" for v in values).encode())
    write_atomic(os.path.join(out_dir, "templates.txt"), "".join(t + "\n" for t in CLASS_TEMPLATES[attribute]).encode())
    return out_dir


def _write_clip_benchmark(out_dir, samples, samples_per_shard, info_files):
    """CLIP_benchmark's webdataset layout: out_dir/test/0.tar, 1.tar, ... of `samples` ((key, {ext: bytes}) in
    order), out_dir/test/nshards.txt, and the dataset's text files `info_files` ({name: text})."""
    _check_int("samples_per_shard", samples_per_shard)
    test = os.path.join(out_dir, "test")
    os.makedirs(test, exist_ok=True)
    samples, shards = iter(samples), 0
    while chunk := list(itertools.islice(samples, samples_per_shard)):
        path = os.path.join(test, f"{shards}.tar")
        write_atomic(path, _tar_writer([(f"{key}.{ext}", data) for key, members in chunk
                                        for ext, data in members.items()]))
        shards += 1
    for name, text in {**info_files, "test/nshards.txt": f"{shards}\n"}.items():
        write_atomic(os.path.join(out_dir, name), text.encode())
    return out_dir


def write_clip_benchmark_classification(out_dir, attribute, num_per_class, seed, split="test", image_size=64,
                                        samples_per_shard=1000):
    """The samples of write_classification_folder (same arguments, same JPEG bytes) as a CLIP_benchmark zero-shot
    classification set: `<index>.jpg` + `<index>.cls` (class index) members, classnames.txt and
    zeroshot_classification_templates.txt (CLIP_benchmark's `{c}` where ours have `{}`)."""
    _check_int("image_size", image_size)
    samples = ((f"{index:09d}", {"jpg": _jpeg(draw_sample(index, seed, split, image_size)[0]),
                                 "cls": str(label).encode()})
               for index, label in _class_samples(attribute, num_per_class, seed, split))  # checks the arguments
    return _write_clip_benchmark(out_dir, samples, samples_per_shard, {
        "classnames.txt": "".join(v + "\n" for v in ATTRIBUTES[attribute]),
        "zeroshot_classification_templates.txt": "".join(t.replace("{}", "{c}") + "\n"
                                                         for t in CLASS_TEMPLATES[attribute])})


def write_clip_benchmark_retrieval(out_dir, num_samples, samples_per_shard=1000, seed=0, split="val", image_size=64,
                                   start_index=0):
    """The image-caption pairs of write_shards (same arguments, same JPEG bytes and captions) as a CLIP_benchmark
    retrieval set: `<key>.jpg` + `<key>.txt` members (one caption each) and dataset_type.txt = retrieval. The tars
    are LAION-style shards too: `python -m training.eval --val-data OUT/test/0.tar` reads the same pairs."""
    _check("split", split, SPLITS)
    for name, value in [("num_samples", num_samples), ("image_size", image_size)]:
        _check_int(name, value)
    _check_int("seed", seed, 0)
    _check_int("start_index", start_index, 0)

    def samples():
        for i in range(start_index, start_index + num_samples):
            image, _, caption = draw_sample(i, seed, split, image_size)
            yield f"{i:09d}", {"jpg": _jpeg(image), "txt": caption.encode()}
    return _write_clip_benchmark(out_dir, samples(), samples_per_shard, {"dataset_type.txt": "retrieval\n"})


def write_labelled_set(out_dir, attributes, num_samples, seed, split="pretrain", image_size=64):
    """Write out_dir/labelled.npz: uint8 images (N, H, W, 3), int64 labels over the product of `attributes`,
    class_names ("circle red", ... in itertools.product order) and the attribute names. Returns its path."""
    if not attributes:
        raise ValueError(f"need at least one attribute; valid: {', '.join(ATTRIBUTES)}")
    for a in attributes:
        _check("attribute", a, ATTRIBUTES)
    if len(set(attributes)) != len(attributes):
        raise ValueError(f"duplicate attribute in {list(attributes)}")
    _check("split", split, SPLITS)
    _check_int("num_samples", num_samples)
    _check_int("seed", seed, 0)
    _check_int("image_size", image_size)
    combos = list(itertools.product(*(ATTRIBUTES[a] for a in attributes)))
    label_of = {c: i for i, c in enumerate(combos)}
    images = np.empty((num_samples, image_size, image_size, 3), np.uint8)
    labels = np.empty(num_samples, np.int64)
    for i in range(num_samples):
        image, attrs, _ = draw_sample(i, seed, split, image_size)
        images[i] = np.asarray(image)
        labels[i] = label_of[tuple(attrs[a] for a in attributes)]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LABELLED_FILE)
    write_atomic(path, lambda f: np.savez(f, images=images, labels=labels,
                                          class_names=np.array([" ".join(c) for c in combos]),
                                          attributes=np.array(attributes)))
    return path


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv=None):
    parser = ArgumentParser(prog="python -m open_clip_3t.toy.synthetic", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output directory")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--image-size", type=positive_int, default=64)

    p = sub.add_parser("shards", parents=[common], help="LAION-style webdataset shards with captions")
    p.add_argument("--num-samples", type=positive_int, required=True)
    p.add_argument("--samples-per-shard", type=positive_int, default=1000)
    p.add_argument("--split", choices=list(SPLITS), default="train")
    p.add_argument("--start-index", type=int, default=0)
    p.add_argument("--format", choices=FORMATS["shards"], default="webdataset",
                   help="webdataset: OUT/00000.tar... (jpg, txt, json) + sizes.json; clip_benchmark: the same pairs "
                        "as CLIP_benchmark's retrieval set (OUT/test/0.tar..., dataset_type.txt)")

    p = sub.add_parser("classification", parents=[common], help="held-out ImageFolder for one attribute")
    p.add_argument("--attribute", choices=list(ATTRIBUTES), required=True)
    p.add_argument("--num-per-class", type=positive_int, required=True)
    p.add_argument("--split", choices=list(SPLITS), default="test")
    p.add_argument("--format", choices=FORMATS["classification"], default="folder",
                   help="folder: ImageFolder + classnames.txt + templates.txt; clip_benchmark: the same images as "
                        "CLIP_benchmark's zero-shot classification set (OUT/test/0.tar..., classnames.txt, "
                        "zeroshot_classification_templates.txt)")

    p = sub.add_parser("labelled", parents=[common], help="labelled .npz set for pretraining a third tower")
    p.add_argument("--attributes", nargs="+", choices=list(ATTRIBUTES), required=True)
    p.add_argument("--num-samples", type=positive_int, required=True)
    p.add_argument("--split", choices=list(SPLITS), default="pretrain")

    args = parser.parse_args(argv)
    try:
        if args.command == "shards" and args.format == "clip_benchmark":
            write_clip_benchmark_retrieval(args.out, args.num_samples, args.samples_per_shard, args.seed, args.split,
                                           args.image_size, args.start_index)
            print(f"wrote {args.num_samples} image-caption pairs as a CLIP_benchmark retrieval set to {args.out}")
        elif args.command == "shards":
            paths = write_shards(args.out, args.num_samples, args.samples_per_shard, args.seed, args.split,
                                 args.image_size, args.start_index)
            print(f"wrote {len(paths)} shards ({args.num_samples} samples) to {args.out}")
        elif args.command == "classification":
            write = write_clip_benchmark_classification if args.format == "clip_benchmark" else write_classification_folder
            write(args.out, args.attribute, args.num_per_class, args.seed, args.split, args.image_size)
            print(f"wrote {len(ATTRIBUTES[args.attribute])} x {args.num_per_class} {args.attribute} images to {args.out}"
                  + (" as a CLIP_benchmark classification set" if args.format == "clip_benchmark" else ""))
        else:
            path = write_labelled_set(args.out, args.attributes, args.num_samples, args.seed, args.split, args.image_size)
            print(f"wrote {args.num_samples} labelled images to {path}")
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
