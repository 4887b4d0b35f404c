"""3DDFA-V3 numerics checked against independent computations: projection, alignment, safe model loading."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from appleswap.faces.tddfa import Bfm68, convert_face_model, load_face_model, safe_load_npy
from appleswap.faces.tddfa.align import align_face, crop_to_image, fit_scale_translation, five_from_68, image_to_crop
from appleswap.faces.tddfa.bfm import project, rotation_matrix, split_coefficients
from appleswap.faces.tddfa.landmark106 import soft_argmax
from appleswap.faces.tddfa.retinaface import decode_boxes, prior_boxes
from tests.fixtures.tiny_tddfa import face_model_dict, template_68


def _independent_projection(model: dict, a_id, a_exp, angles, trans) -> np.ndarray:
    """Full-mesh numpy + scipy version of the reference landmark path, for comparison."""
    verts = (model["u"][:, 0] + model["id"] @ a_id + model["exp"] @ a_exp).reshape(-1, 3).astype(np.float64)
    rot = Rotation.from_euler("xyz", angles).as_matrix()  # extrinsic x, y, z = Rz @ Ry @ Rx
    posed = verts @ rot.T + trans
    cam = np.stack([posed[:, 0], posed[:, 1], 10.0 - posed[:, 2]], axis=1)
    intrinsics = np.array([[1015.0, 0, 112.0], [0, 1015.0, 112.0], [0, 0, 1]])
    pix = cam @ intrinsics.T
    pix = pix[:, :2] / pix[:, 2:]
    pix[:, 1] = 223.0 - pix[:, 1]
    return pix[model["ldm68"]]


def test_projection_matches_independent_full_mesh_computation():
    model = face_model_dict(seed=3)
    rng = np.random.default_rng(1)
    a_id, a_exp = rng.normal(0, 1, 80), rng.normal(0, 1, 64)
    angles, trans = np.array([0.2, -0.35, 0.1]), np.array([0.1, -0.05, 0.3])
    bfm = Bfm68(model["u"], model["id"], model["exp"], model["ldm68"])
    coeffs = {"id": torch.tensor(a_id[None], dtype=torch.float32), "exp": torch.tensor(a_exp[None], dtype=torch.float32),
              "angle": torch.tensor(angles[None], dtype=torch.float32),
              "trans": torch.tensor(trans[None], dtype=torch.float32)}
    ours = bfm.landmarks(coeffs)[0].numpy()
    expected = _independent_projection(model, a_id, a_exp, angles, trans)
    assert ours.shape == (68, 2)
    np.testing.assert_allclose(ours, expected, atol=2e-3)


def test_pinhole_constants_and_pose_directions():
    origin = torch.zeros(1, 1, 3)
    zero = torch.zeros(1, 3)
    np.testing.assert_allclose(project(origin, zero, zero)[0, 0].numpy(), [112.0, 111.0])
    # a point 1 unit to the right and up, at the model origin depth: f / distance = 101.5 px per unit
    np.testing.assert_allclose(project(torch.tensor([[[1.0, 1.0, 0.0]]]), zero, zero)[0, 0].numpy(),
                               [213.5, 9.5], atol=1e-4)
    nose = torch.tensor([[[0.0, 0.0, 0.6]]])
    turned = project(nose, torch.tensor([[0.0, 0.3, 0.0]]), zero)[0, 0]  # positive yaw: nose to the image right
    assert turned[0] > 112.0 + 10
    rot = rotation_matrix(torch.tensor([[0.3, -0.2, 0.5]]))[0]
    np.testing.assert_allclose((rot @ rot.T).numpy(), np.eye(3), atol=1e-6)


def test_split_coefficients_layout():
    alpha = torch.arange(257.0)[None]
    parts = split_coefficients(alpha)
    assert {k: v.shape[1] for k, v in parts.items()} == {"id": 80, "exp": 64, "alb": 80, "angle": 3, "sh": 27,
                                                         "trans": 3}
    assert parts["angle"][0, 0] == 224 and parts["trans"][0, -1] == 256
    with pytest.raises(ValueError, match="257"):
        split_coefficients(torch.zeros(1, 256))


def test_scale_translation_fit_recovers_known_values():
    lm3d = five_from_68(template_68())
    points = 87.5 * lm3d[:, :2] + np.array([300.0, 410.0])
    t, scale = fit_scale_translation(points, lm3d)
    assert scale == pytest.approx(87.5, rel=1e-6)
    np.testing.assert_allclose(t[:, 0], [300.0, 410.0], atol=1e-6)


def test_alignment_crop_and_back_mapping_are_consistent():
    lm3d = five_from_68(template_68())
    image = np.zeros((300, 260, 3), dtype=np.uint8)
    dot = (150, 170)  # (x, y)
    image[dot[1] - 1:dot[1] + 2, dot[0] - 1:dot[0] + 2] = 255
    # 5 image points (y down) of a face centred near the dot, 60 px per model unit
    five = np.stack([130 + 60 * lm3d[:, 0], 160 - 60 * lm3d[:, 1]], axis=1).astype(np.float32)
    crop, params = align_face(image, five, lm3d)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
    assert params[2] == pytest.approx(102.0 / 60.0, rel=1e-4)
    ys, xs = np.nonzero(crop[..., 0] > 100)
    found = crop_to_image(np.array([[xs.mean(), ys.mean()]]), params)[0]
    np.testing.assert_allclose(found, np.array(dot, dtype=np.float64) + 0.5, atol=1.0)
    back = image_to_crop(crop_to_image(np.array([[10.0, 20.0], [200.0, 100.0]]), params), params)
    np.testing.assert_allclose(back, [[10.0, 20.0], [200.0, 100.0]], atol=1e-9)


def test_degenerate_alignment_is_refused():
    lm3d = five_from_68(template_68())
    with pytest.raises(ValueError, match="alignment failed"):
        align_face(np.zeros((100, 100, 3), np.uint8), np.full((5, 2), 50.0, np.float32), lm3d)


def test_soft_argmax_reproduces_row_first_quirk():
    heat = torch.full((1, 2, 14, 14), -1e4)
    heat[0, 0, 3, 10] = 0.0  # row 3, column 10
    heat[0, 1, 12, 1] = 0.0
    out = soft_argmax(heat).view(2, 2).numpy()
    np.testing.assert_allclose(out, [[3 / 14, 10 / 14], [12 / 14, 1 / 14]], atol=1e-6)


def test_priors_and_box_decoding():
    priors = prior_boxes(512)
    assert priors.shape == ((64 * 64 + 32 * 32 + 16 * 16) * 2, 4)
    np.testing.assert_allclose(priors[0].numpy(), [4 / 512, 4 / 512, 16 / 512, 16 / 512])
    np.testing.assert_allclose(priors[1].numpy(), [4 / 512, 4 / 512, 32 / 512, 32 / 512])
    np.testing.assert_allclose(priors[2].numpy(), [12 / 512, 4 / 512, 16 / 512, 16 / 512])  # next column
    boxes = decode_boxes(torch.zeros(2, 4), priors[:2]) * 512
    np.testing.assert_allclose(boxes[0].numpy(), [-4, -4, 12, 12], atol=1e-4)


def test_face_model_loader_reads_pickled_dict_without_pickle(tmp_path):
    model = face_model_dict(seed=0, n_vertices=150)
    path = tmp_path / "face_model.npy"
    np.save(path, np.array(model, dtype=object), allow_pickle=True)
    loaded = load_face_model(path)
    assert set(loaded) == {"u", "id", "exp", "ldm68"}
    np.testing.assert_array_equal(loaded["ldm68"], model["ldm68"])
    np.testing.assert_array_equal(loaded["id"], model["id"])
    full = safe_load_npy(path)
    assert isinstance(full["annotation"], list) and full["parallel"] == [[1, 2, 3], [4, 5]]
    npz = convert_face_model(path, tmp_path / "face_model.npz")
    np.testing.assert_array_equal(load_face_model(npz)["exp"], model["exp"])
    plain = tmp_path / "plain.npy"
    np.save(plain, np.arange(6.0))
    np.testing.assert_array_equal(safe_load_npy(plain), np.arange(6.0))


def test_face_model_loader_refuses_code_and_reads_numpy1_names(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    header = {"descr": "|O", "fortran_order": False, "shape": ()}
    evil = tmp_path / "evil.npy"
    with open(evil, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        pickle.dump(np.array({"u": Evil()}, dtype=object), handle, protocol=3)
    with pytest.raises(ValueError, match="refused"):
        safe_load_npy(evil)
    # files written by NumPy 1.x name numpy.core.multiarray
    old = tmp_path / "old.npy"
    payload = pickle.dumps(np.array({"a": np.arange(3)}, dtype=object), protocol=3)
    payload = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    with open(old, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        handle.write(payload)
    np.testing.assert_array_equal(safe_load_npy(old)["a"], np.arange(3))
