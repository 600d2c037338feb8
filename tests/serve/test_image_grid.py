"""Image grids and class labels of the diffusion sampler (``tessera/serve/images.py``)."""

import numpy as np
import pytest
from PIL import Image

from tessera.serve.images import class_labels, image_grid, to_uint8, write_grid


def test_to_uint8_clips_and_rounds():
    x = np.array([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0], np.float32)
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 128, 255, 255, 255])


def test_grid_places_each_tile_row_major():
    images = np.stack([np.full((3, 2, 3), i * 10, np.uint8) for i in range(5)])
    grid = image_grid(images, pad=1)  # 3 columns, 2 rows
    assert grid.shape == (1 + 2 * 4, 1 + 3 * 3, 3)
    for i in range(5):
        y, x = 1 + (i // 3) * 4, 1 + (i % 3) * 3
        np.testing.assert_array_equal(grid[y : y + 3, x : x + 2], images[i])
    assert (grid[0] == 255).all() and (grid[5:8, 7:9] == 255).all()  # border, the empty slot


def test_write_grid_is_a_png_of_the_grid_scaled(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
    path = tmp_path / "sub" / "grid.png"
    write_grid(images, str(path), scale=2)
    read = np.asarray(Image.open(path))
    grid = image_grid(images)
    assert read.shape == (2 * grid.shape[0], 2 * grid.shape[1], 3)
    np.testing.assert_array_equal(read[::2, ::2], grid)
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]  # no temporary left


def test_class_labels():
    np.testing.assert_array_equal(class_labels(5, -1, 3), [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(class_labels(3, 2, 3), [2, 2, 2])
    with pytest.raises(ValueError, match="class label 3 is not a class of this model"):
        class_labels(2, 3, 3)
