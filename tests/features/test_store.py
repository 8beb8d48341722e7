"""The feature store: atomic writes, TRIDENT and CLAM layouts, unsafe or non-finite files refused."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from slidemil.features.store import find_feature_file, read_features, write_features


def test_write_read_roundtrip_is_atomic(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    coords = np.arange(100).reshape(50, 2)
    path = write_features(tmp_path / "s.h5", x, coords, {"encoder": "enc", "patch_size": 256})
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]
    bag = read_features(path)
    np.testing.assert_array_equal(bag.features, x)
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.attrs["encoder"] == "enc" and bag.attrs["embedding_dim"] == 8
    with h5py.File(path) as fh:
        assert fh["coords"].dtype == np.int64 and fh["coords"].attrs["patch_size"] == 256


def test_reads_trident_and_clam_layouts(tmp_path):
    x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    # TRIDENT: features + coords with attributes on coords only, one-row chunks
    trident = tmp_path / "trident" / "features_uni_v1"
    trident.mkdir(parents=True)
    with h5py.File(trident / "s1.h5", "w") as fh:
        fh.create_dataset("features", data=x, chunks=(1, 5))
        c = fh.create_dataset("coords", data=np.zeros((7, 2), np.int64))
        c.attrs["patch_size_level0"] = 512
        fh.attrs["encoder"] = "uni_v1"
    bag = read_features(find_feature_file(trident, "s1"))
    assert bag.attrs["patch_size_level0"] == 512 and bag.attrs["encoder"] == "uni_v1"
    # CLAM: feat_dir/h5_files (int32 coords, no attributes) and feat_dir/pt_files
    clam = tmp_path / "clam"
    (clam / "pt_files").mkdir(parents=True)
    torch.save(torch.from_numpy(x), clam / "pt_files" / "s2.pt")
    assert find_feature_file(clam, "s2").name == "s2.pt"
    np.testing.assert_allclose(read_features(clam / "pt_files" / "s2.pt").features, x)
    (clam / "h5_files").mkdir()
    with h5py.File(clam / "h5_files" / "s3.h5", "w") as fh:
        fh.create_dataset("features", data=x)
        fh.create_dataset("coords", data=np.zeros((7, 2), np.int32))
    assert read_features(find_feature_file(clam, "s3")).coords.dtype == np.int64


def test_pt_file_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pt"
    torch.save({"features": Evil()}, path)
    with pytest.raises(ValueError, match=r"evil\.pt: not a tensor file \(refused to unpickle"):
        read_features(path)


def test_nan_features_are_rejected_with_the_file(tmp_path):
    path = write_features(tmp_path / "bad.h5", np.full((3, 2), np.nan), None)
    with pytest.raises(ValueError, match=r"bad\.h5: features contain NaN"):
        read_features(path)
