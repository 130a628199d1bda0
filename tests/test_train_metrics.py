"""Metrics against values computed by hand on tiny examples (derivations in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.train.metrics import (
    average_precision,
    classification_metrics,
    gap_at_k,
    hit_at_k,
    improved,
    multilabel_metrics,
    regression_metrics,
)


def test_regression_metrics_by_hand():
    # errors 0, -1, 1; centred pred -1,0,1 and target -1,1,0: cov 1/3, variances 2/3 -> r = 1/2
    m = regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0]), train_mean=2.0)
    assert m["mse"] == pytest.approx(2 / 3)
    assert m["rmse"] == pytest.approx(math.sqrt(2 / 3))
    assert m["mae"] == pytest.approx(2 / 3)
    assert m["pearson_r"] == pytest.approx(0.5)
    assert m["baseline_mse"] == pytest.approx(2 / 3)  # (1-2)^2 + (3-2)^2 + 0, over 3


def test_regression_constant_prediction_has_no_pearson_r():
    m = regression_metrics(np.full(3, 2.0), np.array([1.0, 2.0, 4.0]), train_mean=2.0)
    assert m["pearson_r"] is None  # undefined, and JSON has no NaN
    assert m["mse"] == pytest.approx(m["baseline_mse"]) == pytest.approx(5 / 3)


PROBS = np.array(
    [
        [0.7, 0.2, 0.1],  # target 0: right
        [0.1, 0.5, 0.4],  # target 2: wrong (1), in top 2
        [0.2, 0.3, 0.5],  # target 2: right
        [0.6, 0.3, 0.1],  # target 1: wrong (0), in top 2
    ]
)
TARGET = np.array([0, 2, 2, 1])


def test_classification_metrics_by_hand():
    m = classification_metrics(PROBS, TARGET, top_k=2)
    assert m["accuracy"] == 0.5
    assert m["top2_accuracy"] == 1.0
    # F1: class 0 tp1 fp1 fn0 -> 2/3; class 1 tp0 fp1 fn1 -> 0; class 2 tp1 fp0 fn1 -> 2/3
    assert m["macro_f1"] == pytest.approx(4 / 9)


def test_top_k_is_capped_at_the_number_of_classes():
    m = classification_metrics(PROBS, TARGET, top_k=5)
    assert m["top3_accuracy"] == 1.0


SCORES = np.array([[0.9, 0.6, 0.1], [0.2, 0.8, 0.7], [0.3, 0.4, 0.55]])
TAGS = np.array([[1, 0, 0], [0, 0, 1], [1, 1, 0]])


def test_hit_at_k_by_hand():
    # best tag: clip 0 tag 0 (true), clip 1 tag 1 (false), clip 2 tag 2 (false)
    assert hit_at_k(SCORES, TAGS, 1) == pytest.approx(1 / 3)
    # two best: {0,1} has 0; {1,2} has 2; {2,1} has 1
    assert hit_at_k(SCORES, TAGS, 2) == 1.0


def test_gap_pools_top_predictions_of_all_clips():
    # ranked: .9T .8F .7T .6F .55F .4T .3T .2F .1F; 4 positives at ranks 1, 3, 6, 7
    expected = (1 / 1 + 2 / 3 + 3 / 6 + 4 / 7) / 4
    assert gap_at_k(SCORES, TAGS, 20) == pytest.approx(expected)
    # top 1 per clip: .9T .8F .55F; a true tag not in anyone's top 1 still counts in the 4
    assert gap_at_k(SCORES, TAGS, 1) == pytest.approx(1 / 4)


def test_multilabel_metrics_by_hand():
    m = multilabel_metrics(SCORES, TAGS, threshold=0.5)
    assert m["hit_at_1"] == pytest.approx(1 / 3)
    assert m["hit_at_2"] == 1.0
    # AP per tag: tag 0 [.9T .3T .2F] = 1; tag 1 [.8F .6F .4T] = 1/3; tag 2 [.7T ...] = 1
    assert m["map"] == pytest.approx(7 / 9)
    # predicted at 0.5: {0,1}, {1,2}, {2} = 5 tags, 2 of them true; 4 true tags in all
    assert m["precision"] == pytest.approx(2 / 5)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(4 / 9)


def test_average_precision_counts_positives_outside_the_ranking():
    assert average_precision(np.array([0.9, 0.1]), np.array([True, False])) == 1.0
    assert average_precision(np.array([0.9, 0.1]), np.array([True, False]), 2) == 0.5
    assert math.isnan(average_precision(np.array([0.5]), np.array([False])))


def test_improved_watches_the_main_metric_and_breaks_ties_on_loss():
    assert improved("regression", {"mse": 1.0}, None)
    assert improved("regression", {"mse": 0.5}, {"mse": 1.0})
    assert not improved("regression", {"mse": 1.5}, {"mse": 1.0})
    assert improved("classification", {"accuracy": 0.8}, {"accuracy": 0.7})
    assert improved(
        "classification", {"accuracy": 1.0, "loss": 0.1}, {"accuracy": 1.0, "loss": 0.2}
    )
    assert not improved("multilabel", {"gap_at_20": 0.5}, {"gap_at_20": 0.6})
