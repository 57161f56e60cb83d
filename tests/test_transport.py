import numpy as np
import pytest
import torch

from meduniverse_flwr.wire.transport import decode, encode


def test_fp32_is_lossless_and_fp16_bf16_halve_the_bytes():
    rng = np.random.default_rng(0)
    arrays = {"w": rng.normal(size=(64, 32)).astype(np.float32), "b": rng.normal(size=7).astype(np.float32)}
    assert all(np.array_equal(decode(encode(arrays, "fp32"), "fp32")[k], arrays[k]) for k in arrays)
    for dtype in ("fp16", "bf16"):
        sent = encode(arrays, dtype)
        assert sum(v.nbytes for v in sent.values()) * 2 == sum(v.nbytes for v in arrays.values())
        back = decode(sent, dtype)
        assert back["w"].dtype == np.float32
        np.testing.assert_allclose(back["w"], arrays["w"], rtol=1e-2 if dtype == "bf16" else 1e-3, atol=1e-3)


def test_bf16_matches_torch_rounding_exactly():
    x = np.random.default_rng(1).normal(scale=3, size=10_000).astype(np.float32)
    x[:4] = [0.0, -0.0, np.inf, 1e-40]
    ours = decode(encode({"x": x}, "bf16"), "bf16")["x"]
    theirs = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert np.isnan(decode(encode({"x": np.array([np.nan], np.float32)}, "bf16"), "bf16")["x"]).all()


def test_wrong_encoding_is_rejected():
    with pytest.raises(ValueError, match="'w' arrived as float32, expected uint16"):
        decode({"w": np.zeros(3, np.float32)}, "bf16")
    with pytest.raises(ValueError, match="unknown"):
        encode({}, "int8")
