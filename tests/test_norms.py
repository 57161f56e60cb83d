"""An update against its base: whether it may be aggregated (``validation.check_update``) and its norms
(``norms``), on plain arrays."""

import math
import re
import warnings

import numpy as np
import pytest

from meduniverse_flwr.server.norms import array_norm, clip_update, relative_update_norm, update_norm
from meduniverse_flwr.server.validation import check_update


def arrays(w, b):
    return {"w": np.array(w, dtype=np.float32), "b": np.array(b, dtype=np.float32)}


A = arrays([[1.0, 2.0], [3.0, 4.0]], [0.0])
B = arrays([[5.0, 6.0], [7.0, 8.0]], [4.0])


@pytest.mark.parametrize(
    "update, reason",
    [
        ({"w": A["w"]}, "missing keys \\['b'\\]"),
        ({**A, "head.weight": np.zeros(2, np.float32)}, "unexpected keys"),
        ({"w": np.zeros((2, 3), np.float32), "b": A["b"]}, "shape \\(2, 3\\)"),
        ({"w": A["w"], "b": np.array([np.nan], np.float32)}, "NaN"),
        ({"w": A["w"].astype(np.int64), "b": A["b"]}, "dtype int64"),
    ],
)
def test_check_update_names_the_problem(update, reason):
    problem = check_update(A, update)
    assert problem is not None
    assert re.search(reason, problem)
    assert check_update(A, B) is None



@pytest.mark.parametrize(
    "update, reason",
    [
        ({"w": A["w"].astype(np.float64), "b": A["b"]}, "'w' has dtype float64, expected float32"),
        ({"w": A["w"].astype(np.float16), "b": A["b"]}, "'w' has dtype float16, expected float32"),
        ({"w": A["w"].tolist(), "b": A["b"]}, "'w' is a list, expected an array"),
        ({**A, "evil\n\x1b[2J" + "x" * 100: np.zeros(1, np.float32)}, "unexpected keys ['evil\\n\\x1b[2Jxxx"),
    ],
)
def test_check_update_wants_the_base_dtype_and_reasons_stay_one_line(update, reason):
    problem = check_update(A, update)
    assert problem.startswith(reason) and problem.isprintable() and len(problem) < 200


def test_update_norm_is_the_l2_norm_of_the_difference():
    assert update_norm(A, B) == pytest.approx(math.sqrt(4 * 16 + 16))
    assert array_norm(A) == pytest.approx(math.sqrt(30))
    assert relative_update_norm(A, B) == pytest.approx(math.sqrt(80 / 30))
    assert update_norm(A, A) == 0.0



def test_update_norm_does_not_overflow_at_the_float32_maximum():
    top = np.finfo(np.float32).max
    huge = {"w": np.full((2, 2), top, np.float32), "b": np.array([-top], np.float32)}
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        norm = update_norm(A, huge)
    assert math.isfinite(norm) and norm == pytest.approx(math.sqrt(5) * float(top), rel=1e-6)



def test_an_update_norm_past_float64_is_inf_not_a_crash():
    base, update = {"w": np.array([1e308, -1e308])}, {"w": np.array([-1e308, 1e308])}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert update_norm(base, update) == math.inf
    with pytest.raises(ValueError, match="overflows"):
        clip_update(base, update, 1.0)



def test_relative_update_norm_against_a_zero_base():
    zero = {"w": np.zeros(2, np.float32)}
    assert relative_update_norm(zero, zero) == 0.0
    assert relative_update_norm(zero, {"w": np.ones(2, np.float32)}) == math.inf



def test_clip_update_scales_the_delta_down_to_the_bound():
    clipped = clip_update(A, B, 2.0)
    assert update_norm(A, clipped) == pytest.approx(2.0, rel=1e-6)
    delta = clipped["w"].astype(np.float64) - A["w"]
    np.testing.assert_allclose(delta, (B["w"] - A["w"]) * 2.0 / math.sqrt(80), rtol=1e-6)
    assert all(clipped[k].dtype == np.float32 for k in clipped)
    assert clip_update(A, B, 100.0)["w"] is B["w"]  # within the bound: as sent
    np.testing.assert_array_equal(clip_update(A, B, 0.0)["w"], A["w"])
