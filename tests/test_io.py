import numpy as np
import pytest
from cxr_audit.data.io import read_image, read_mask
from cxr_audit.errors import BadInputError
from PIL import Image


def test_8bit_png(tmp_path):
    arr = (np.arange(64 * 32) % 256).reshape(32, 64).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.shape == (32, 64) and out.dtype == np.float32
    np.testing.assert_allclose(out, arr / 255.0, atol=1e-6)


def test_16bit_png_keeps_precision(tmp_path):
    arr = np.linspace(0, 65535, 40 * 40).reshape(40, 40).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "a16.png")
    out = read_image(tmp_path / "a16.png")
    np.testing.assert_allclose(out, arr / 65535.0, atol=1e-6)
    # values that collide after 8-bit quantisation stay distinct
    assert len(np.unique(out)) > 256


def test_rgb_is_converted_to_gray(tmp_path):
    arr = np.zeros((10, 10, 3), np.uint8)
    arr[..., 0] = 255
    Image.fromarray(arr).save(tmp_path / "rgb.png")
    out = read_image(tmp_path / "rgb.png")
    assert out.shape == (10, 10)
    assert 0.25 < out.mean() < 0.35  # ITU-R 601 luma of pure red


def _write_dicom(path, pixels, photometric="MONOCHROME2", slope=1.0, intercept=0.0, center=None, width=None):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_dicom_monochrome1_is_inverted(tmp_path):
    pixels = np.tile(np.arange(0, 1000, 10, dtype=np.uint16), (8, 1))
    _write_dicom(tmp_path / "m2.dcm", pixels, "MONOCHROME2")
    _write_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1")
    m2, m1 = read_image(tmp_path / "m2.dcm"), read_image(tmp_path / "m1.dcm")
    assert m2[0, 0] == pytest.approx(0.0) and m2[0, -1] == pytest.approx(1.0)
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)


def test_dicom_rescale_and_window(tmp_path):
    pixels = np.tile(np.arange(0, 200, 2, dtype=np.uint16), (4, 1))  # 0..198
    # stored * 2 - 100 -> -100..296; window [0, 200] clips both ends
    _write_dicom(tmp_path / "w.dcm", pixels, slope=2.0, intercept=-100.0, center=100, width=200)
    out = read_image(tmp_path / "w.dcm")
    hu = pixels * 2.0 - 100
    np.testing.assert_allclose(out, np.clip(hu / 200.0, 0, 1), atol=1e-6)


def test_dicom_without_suffix_is_detected(tmp_path):
    _write_dicom(tmp_path / "noext", np.full((4, 4), 7, np.uint16))
    assert read_image(tmp_path / "noext").shape == (4, 4)


def test_corrupt_and_missing_images_raise_one_line_errors(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(BadInputError, match="bad.png"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(BadInputError, match="not found"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "bad.dcm").write_bytes(b"not dicom")
    with pytest.raises(BadInputError, match="bad.dcm"):
        read_image(tmp_path / "bad.dcm")


def test_mask_is_boolean(tmp_path):
    arr = np.zeros((5, 5), np.uint8)
    arr[1:3, 1:3] = 255
    Image.fromarray(arr).save(tmp_path / "m.png")
    m = read_mask(tmp_path / "m.png")
    assert m.dtype == bool and m.sum() == 4
