import json

import ml_collections
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from tessera.data import (
    SHAPE_CLASSES,
    ArrayRecordSource,
    ImageFolderSource,
    NpzSource,
    ShapesSource,
    image_classes,
    load_image,
    make_image_pipeline,
    make_source,
    write_array_record,
)
from tests.data.batches import take


def cfg(**kw):
    base = dict(source="shapes", path="", eval_path="", seed=0, augment=False, crop_padding=2)
    return ml_collections.ConfigDict({**base, **kw})


def numbered_images(n, size=(6, 5)):
    """n uint8 images: image i is filled with 10 * i % 250, plus a ramp along W (flips show)."""
    ramp = np.arange(size[1], dtype=np.uint8)[None, :, None]
    return np.stack([np.full((*size, 3), 10 * i % 250, np.uint8) + ramp for i in range(n)])


def write_folder(root, files):
    """Writes PNGs `root/<class>/<name>` from {"class/name.png": uint8 image}."""
    for name, image in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / name)
    return root


def write_npz(path, n=10):
    np.savez(path, images=numbered_images(n, (8, 8)), labels=np.arange(n))
    return path


def pipeline(data_cfg, **kw):
    return make_image_pipeline(data_cfg, **{"global_batch_size": 4, "image_size": 8, **kw})


def test_shapes_are_deterministic_with_disjoint_splits():
    train, again = ShapesSource(0, "train", 16), ShapesSource(0, "train", 16)
    assert (len(train), len(ShapesSource(0, "eval", 16))) == (50_000, 1_000)
    ex = train[7]
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (16, 16, 3)
    assert ex["image"].tobytes() == again[7]["image"].tobytes() and ex["label"] == again[7]["label"]
    assert ex["image"].tobytes() != ShapesSource(1, "train", 16)[7]["image"].tobytes()
    train_set = {train[i]["image"].tobytes() for i in range(40)}
    eval_set = {ShapesSource(0, "eval", 16)[i]["image"].tobytes() for i in range(40)}
    assert len(train_set) == 40 and not train_set & eval_set
    with pytest.raises(IndexError, match="out of range"):
        train[50_000]


def test_shapes_labels_cover_all_classes_roughly_balanced():
    labels = [ShapesSource(3, "train", 8)[i]["label"] for i in range(180)]
    counts = np.bincount(labels, minlength=len(SHAPE_CLASSES))
    assert len(counts) == len(SHAPE_CLASSES) == 6 and counts.min() >= 15, counts


def test_image_folder_reads_what_was_written(tmp_path):
    images = numbered_images(3)
    files = {"dog/a.png": images[0], "cat/b.png": images[1], "cat/c.PNG": images[2]}
    root = write_folder(tmp_path / "imgs", files)
    (root / "cat" / "notes.txt").write_text("not an image")
    src = ImageFolderSource(root)
    assert src.classes == ("cat", "dog") and len(src) == 3
    for i, (want, label) in enumerate([(images[1], 0), (images[2], 0), (images[0], 1)]):
        np.testing.assert_array_equal(src[i]["image"], want)
        assert src[i]["label"] == label
    assert image_classes(cfg(source="image_folder", path=str(root))) == ("cat", "dog")


def test_held_out_split_partitions_files_and_indices(tmp_path):
    images = numbered_images(1)[0]
    root = write_folder(tmp_path, {f"c{i % 2}/{i}.png": images for i in range(60)})
    npz = write_npz(tmp_path / "d.npz", n=60)
    for make in (lambda s: ImageFolderSource(root, s), lambda s: NpzSource(npz, s)):
        all_, train, held = make("all"), make("train"), make("eval")
        assert 0 < len(held) < 10 and len(train) + len(held) == len(all_) == 60
    train, held = ({ex["label"] for ex in NpzSource(npz, s)} for s in ("train", "eval"))
    assert not train & held and train | held == set(range(60))


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found: .*missing"):
        ImageFolderSource(tmp_path / "missing")
    root = tmp_path / "train"
    root.mkdir()
    with pytest.raises(ValueError, match="has no class sub-folders"):
        ImageFolderSource(root)
    (root / "cat").mkdir()
    (root / "cat" / "x.txt").write_text("")
    with pytest.raises(ValueError, match="class folder .*cat has no images"):
        ImageFolderSource(root)
    (root / "cat" / "bad.png").write_bytes(b"\x89PNG not really")
    src = ImageFolderSource(root)
    with pytest.raises(ValueError, match="cannot decode image .*bad.png"):
        src[0]
    other = write_folder(tmp_path / "other", {"dog/a.png": numbered_images(1)[0]})
    data = cfg(source="image_folder", path=str(root), eval_path=str(other))
    with pytest.raises(ValueError, match=r"class names differ .*missing \['cat'\]"):
        pipeline(data, split="eval")


def test_npz_reads_rgb_and_grey(tmp_path):
    images = numbered_images(4)
    np.savez(tmp_path / "rgb.npz", images=images, labels=[0, 1, 1, 0], classes=["no", "yes"])
    np.savez(tmp_path / "grey.npz", images=images[..., 0], labels=[0, 1, 2, 0])
    np.savez(tmp_path / "one.npz", images=images[..., :1], labels=[0, 1, 2, 0])
    rgb = NpzSource(tmp_path / "rgb.npz")
    assert rgb.classes == ("no", "yes") and len(rgb) == 4 and rgb[2]["label"] == 1
    np.testing.assert_array_equal(rgb[2]["image"], images[2])
    for name in ("grey", "one"):
        src = NpzSource(tmp_path / f"{name}.npz")
        assert src.classes == ("0", "1", "2")
        np.testing.assert_array_equal(src[3]["image"], np.repeat(images[3, ..., :1], 3, -1))


@pytest.mark.parametrize(
    "arrays, error",
    [
        (dict(images=numbered_images(2)), "has no 'labels' array"),
        (dict(images=numbered_images(2), labels=[0]), "2 images but 1 labels"),
        (dict(images=numbered_images(2)[..., :2], labels=[0, 1]), r"must be \[N, H, W, 3\]"),
        (dict(images=numbered_images(2), labels=[0, 2], classes=["a", "b"]), "label 2 out of"),
    ],
)
def test_npz_errors(tmp_path, arrays, error):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(ValueError, match=error):
        NpzSource(tmp_path / "d.npz")


def test_array_record_round_trip_and_shards(tmp_path):
    images = numbered_images(5)
    write_array_record(tmp_path / "a-0", images[:3], [0, 1, 2], classes=["x", "y", "z"])
    write_array_record(tmp_path / "a-1", images[3:, ..., :1], [2, 0], classes=["x", "y", "z"])
    one = ArrayRecordSource(tmp_path / "a-0")
    assert one.classes == ("x", "y", "z") and len(one) == 3 and one[1]["label"] == 1
    np.testing.assert_array_equal(one[1]["image"], images[1])
    both = ArrayRecordSource(str(tmp_path / "a-*"))
    assert len(both) == 5 and [both[i]["label"] for i in range(5)] == [0, 1, 2, 2, 0]
    np.testing.assert_array_equal(both[4]["image"], np.repeat(images[4, ..., :1], 3, -1))
    with pytest.raises(FileExistsError, match="a-0"):
        write_array_record(tmp_path / "a-0", images[:1], [0])


def test_array_record_errors(tmp_path):
    write_array_record(tmp_path / "good", numbered_images(1), [0])
    bad = tmp_path / "bad"
    writer = ArrayRecordWriter(str(bad), "group_size:1")
    writer.write(ArrayRecordSource(tmp_path / "good")._readers[0].read([0])[0])  # the header
    writer.write(b"TIE1\x00\x00\x00\x00not an image")
    writer.write(b"junk")
    writer.close()
    src = ArrayRecordSource(bad)
    with pytest.raises(ValueError, match=f"cannot decode image {bad} record 1"):
        src[0]
    with pytest.raises(ValueError, match=f"{bad} record 2 is not a tessera image example"):
        src[1]
    with pytest.raises(FileNotFoundError, match="no array_record files match"):
        ArrayRecordSource(str(tmp_path / "none-*"))
    (tmp_path / "junk").write_bytes(b"junk" * 100)
    with pytest.raises(ValueError, match="junk is not a readable array_record file"):
        ArrayRecordSource(tmp_path / "junk")


def test_pipeline_batch_layout(tmp_path):
    b = next(pipeline(cfg(augment=True)))
    assert b["images"].shape == (4, 8, 8, 3) and b["images"].dtype == np.float32
    assert b["label"].shape == (4,) and b["label"].dtype == np.int32
    assert b["images"].min() >= -1 and b["images"].max() <= 1 and b["images"].std() > 0.1
    root = write_folder(tmp_path, {"a/x.png": numbered_images(1, (20, 11))[0]})
    b = next(
        pipeline(cfg(source="image_folder", path=str(root), eval_path=str(root)), split="eval")
    )
    assert b["images"].shape == (4, 8, 8, 3) and b["label"].tolist() == [0, -1, -1, -1]


def test_eval_reads_in_order_and_pads(tmp_path):
    npz = str(write_npz(tmp_path / "d.npz"))
    batches = list(pipeline(cfg(source="npz", path=npz, eval_path=npz), split="eval"))
    assert [b["label"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, -1, -1]]
    np.testing.assert_array_equal(batches[2]["images"][2:], 0)
    want = numbered_images(4, (8, 8)).astype(np.float32) / 127.5 - 1  # no resize at 8 x 8
    np.testing.assert_array_equal(batches[0]["images"], want)


def test_processes_read_disjoint_shards_covering_the_split(tmp_path):
    npz = str(write_npz(tmp_path / "d.npz"))
    data = cfg(source="npz", path=npz, eval_path=npz)
    for split, rows in (("eval", 6), ("train", 5)):
        seen = []
        for p in range(2):
            its = pipeline(data, split=split, process_index=p, process_count=2)
            labels = np.concatenate([b["label"] for b in take(its, 3)])[:rows]
            seen.append(set(labels.tolist()) - {-1})
        assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(10)), split


def test_resume_gives_the_same_augmented_batches():
    data = cfg(augment=True)
    it = pipeline(data)
    take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    continued = take(it, 2)
    resumed = pipeline(data)
    resumed.set_state(state)
    for x, y in zip(continued, take(resumed, 2), strict=True):
        np.testing.assert_array_equal(x["images"], y["images"])
        np.testing.assert_array_equal(x["label"], y["label"])
    with pytest.raises(ValueError, match="augment=True"):
        pipeline(cfg(augment=False)).set_state(state)


def test_augmentation_changes_train_images_only(tmp_path):
    npz = str(write_npz(tmp_path / "d.npz", n=8))
    plain, augmented = (cfg(source="npz", path=npz, eval_path=npz, augment=a) for a in (0, 1))
    x, y = next(pipeline(plain, image_size=5)), next(pipeline(augmented, image_size=5))
    np.testing.assert_array_equal(x["label"], y["label"])  # same shuffle
    assert not np.array_equal(x["images"], y["images"])
    x, y = (next(pipeline(d, image_size=5, split="eval")) for d in (plain, augmented))
    np.testing.assert_array_equal(x["images"], y["images"])


def test_load_image_matches_the_eval_pipeline(tmp_path):
    root = write_folder(tmp_path, {"a/x.png": numbered_images(1, (20, 11))[0]})
    b = next(
        pipeline(cfg(source="image_folder", path=str(root), eval_path=str(root)), split="eval")
    )
    np.testing.assert_array_equal(load_image(root / "a" / "x.png", 8), b["images"][0])
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match="cannot decode image .*bad.jpg"):
        load_image(tmp_path / "bad.jpg", 8)
    with pytest.raises(FileNotFoundError, match="image file not found: .*gone.png"):
        load_image(tmp_path / "gone.png", 8)


def test_text_and_image_source_names_are_told_apart():
    with pytest.raises(ValueError, match="'synthetic' is a text source .*image sources: shapes"):
        pipeline(cfg(source="synthetic"))
    with pytest.raises(ValueError, match="'npz' is an image source .*text sources: synthetic"):
        make_source(cfg(source="npz"), "train")
    assert image_classes(cfg()) == SHAPE_CLASSES
