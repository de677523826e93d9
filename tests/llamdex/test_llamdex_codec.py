"""FeatureCodec: the expert's input layout, encode/decode round trips and refusals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from llamdex.codec import FeatureCodec


def test_layout_follows_schema_order(toy):
    c = FeatureCodec(toy)
    assert c.columns == ["age", "fare", "sex=male", "sex=female", "alone"]
    assert c.m == 5
    assert c.slices == {"age": slice(0, 1), "fare": slice(1, 2), "sex": slice(2, 4), "alone": slice(4, 5)}
    assert c.num_classes == 2 and c.output_size == 1
    toy["target"]["classes"].append({"name": "maybe"})
    assert FeatureCodec(toy).output_size == 3


def test_encode_scales_clips_one_hots_and_handles_missing_categories(toy):
    c = FeatureCodec(toy)
    rows = [
        {"age": 50, "fare": 150.0, "sex": "female", "alone": True},
        {"age": 120, "fare": -3.0, "sex": None, "alone": "no"},
        {"age": 0, "fare": 600.0, "sex": float("nan"), "alone": 0},
    ]
    x = c.encode(rows)
    assert x.dtype == np.float32 and x.shape == (3, 5)
    np.testing.assert_allclose(x[0], [0.5, 0.25, 0, 1, 1])
    np.testing.assert_allclose(x[1], [1.0, 0.0, 0, 0, 0])  # clipped; missing category -> all zeros
    np.testing.assert_allclose(x[2], [0.0, 1.0, 0, 0, 0])
    np.testing.assert_array_equal(c.encode(pd.DataFrame(rows)), x)
    np.testing.assert_array_equal(c.encode(rows[0]), x[:1])


def test_decode_inverts_encode(toy):
    c = FeatureCodec(toy)
    rows = [{"age": 42, "fare": 7.25, "sex": "male", "alone": False},
            {"age": 3, "fare": 512.33, "sex": None, "alone": True}]
    assert c.decode(c.encode(rows)) == rows


def test_decode_picks_nearest_category_or_missing_and_rounds(toy):
    c = FeatureCodec(toy)
    out = c.decode(np.array([[0.424, 0.5, 0.2, 0.7, 0.4],
                             [0.426, 0.5, 0.45, 0.3, 0.6]]))
    assert out[0] == {"age": 42, "fare": 300.0, "sex": "female", "alone": False}
    assert out[1]["age"] == 43 and out[1]["sex"] is None and out[1]["alone"] is True
    assert isinstance(out[0]["age"], int)
    with pytest.raises(ValueError, match=r"array: expected shape \(N, 5\)"):
        c.decode(np.zeros((2, 4)))


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        ({"age": 1, "fare": 1.0, "sex": "other", "alone": True}, "sex: row 0 has unknown category 'other'"),
        ({"age": None, "fare": 1.0, "sex": "male", "alone": True}, "age: row 0 is missing"),
        ({"age": 1, "fare": "cheap", "sex": "male", "alone": True}, "fare: non-numeric"),
        ({"age": 1, "fare": 1.0, "sex": "male", "alone": "maybe"}, "alone: 'maybe' is not a bool"),
        ({"age": 1, "fare": 1.0, "sex": "male"}, "columns ['alone'] are missing"),
    ],
)
def test_encode_refusals_name_the_feature(toy, row, fragment):
    with pytest.raises(ValueError, match="fix") as info:
        FeatureCodec(toy).encode([row])
    assert fragment in str(info.value)


def test_labels_map_to_class_order(toy):
    c = FeatureCodec(toy)
    np.testing.assert_array_equal(c.encode_labels(["yes", "no", "yes"]), [1, 0, 1])
    assert c.decode_labels([0, 1]) == ["no", "yes"]
    with pytest.raises(ValueError, match="survived: row 1 has unknown class 'perhaps'"):
        c.encode_labels(["no", "perhaps"])
