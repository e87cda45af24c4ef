import numpy as np
import pytest

from synfer_ray.errors import SynferError
from synfer_ray.labeler.rectify import align_probabilities, rectify

# Two voters, three rows, three classes.
VOTES = np.array([
    [[0.8, 0.1, 0.1], [0.2, 0.5, 0.3], [0.4, 0.3, 0.3]],
    [[0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]],
])


def test_soft_label_is_the_weighted_mean_and_label_its_argmax():
    result = rectify(VOTES, tau=0.0)
    np.testing.assert_allclose(result.soft_label[0], [0.7, 0.2, 0.1])
    assert result.label_index.tolist() == [0, 2, 0]  # row 1: (0.5+0.1)/2=.3 vs (0.3+0.8)/2=.55
    weighted = rectify(VOTES, weights=[3, 1], tau=0.0)
    np.testing.assert_allclose(weighted.soft_label[1], [0.175, 0.4, 0.425])


def test_rows_below_tau_are_rejected():
    result = rectify(VOTES, tau=0.5)
    assert result.accepted.tolist() == [True, True, False]  # row 2's best is 0.35
    np.testing.assert_allclose(result.confidence, [0.7, 0.55, 0.35], rtol=1e-6)


def test_target_agreement_is_optional():
    targets = np.array([0, 1, 0])
    assert rectify(VOTES, tau=0.0, targets=targets).accepted.all()
    agreeing = rectify(VOTES, tau=0.0, targets=targets, require_target_agreement=True)
    assert agreeing.accepted.tolist() == [True, False, True]


def test_bad_inputs_are_named():
    with pytest.raises(SynferError, match="weights"):
        rectify(VOTES, weights=[1.0])
    with pytest.raises(SynferError, match="votes"):
        rectify(np.zeros((0, 3, 3)))
    with pytest.raises(SynferError, match="targets"):
        rectify(VOTES, require_target_agreement=True)


def test_voters_with_other_class_orders_are_aligned():
    probabilities = np.array([[0.1, 0.6, 0.2, 0.1]])  # classes: sad, happy, neutral, contempt
    aligned = align_probabilities(probabilities, ["sad", "happy", "neutral", "contempt"],
                                  ["neutral", "happy", "sad"], "v")
    np.testing.assert_allclose(aligned, [[0.2 / 0.9, 0.6 / 0.9, 0.1 / 0.9]])
    with pytest.raises(SynferError, match="lacks.*fear"):
        align_probabilities(probabilities, ["sad", "happy", "neutral", "contempt"], ["fear"], "v")
