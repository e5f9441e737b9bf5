import math

import numpy as np
import torch

from ciss.metrics import ConfusionMatrix, format_table, forgetting, step_metrics
from ciss.types import IGNORE


def test_confusion_iou_by_hand():
    label = torch.tensor([[[0, 0, 1, 1], [2, 2, IGNORE, 1]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 1]]])
    cm = ConfusionMatrix(3)
    cm.update(pred, label)
    # class 0: tp 1, fp 1 (pixel of class 2 predicted 0), fn 1 -> 1/3
    # class 1: tp 3, fp 1, fn 0 -> 3/4 ; class 2: tp 1, fp 0, fn 1 -> 1/2 (ignored pixel not counted)
    np.testing.assert_allclose(cm.iou(), [1 / 3, 3 / 4, 1 / 2])
    assert cm.mat.sum() == 7


def test_streaming_equals_single_update():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 5, (4, 8, 8), generator=g)
    pred = torch.randint(0, 5, (4, 8, 8), generator=g)
    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(pred, label)
    for i in range(4):
        b.update(pred[i : i + 1], label[i : i + 1])
    assert torch.equal(a.mat, b.mat)


def test_label_outside_classes_is_an_error():
    cm = ConfusionMatrix(2)
    try:
        cm.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 3))
    except ValueError as exc:
        assert "relabel" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_old_new_all_split_and_absent_classes():
    cm = ConfusionMatrix(4)
    label = torch.tensor([[[0, 1, 2, 2]]])
    cm.update(label.clone(), label)  # class 3 never appears: NaN, excluded from means
    m = step_metrics(cm, step=1, num_base=2)
    assert m.miou_old == 1.0 and m.miou_new == 1.0 and m.miou_all == 1.0
    assert math.isnan(m.iou[3])
    assert m.ranges() == ("0-1", "2-3")
    d = m.as_dict()
    assert d["iou"][3] is None and d["miou_all"] == 1.0


def test_forgetting_and_table():
    history = [[0.9, 0.8], [0.7, 0.5, 0.6]]
    f = forgetting(history, (2, 1))
    np.testing.assert_allclose(f, [0.2, 0.3, 0.0])
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[[0, 1, 2]]]), torch.tensor([[[0, 1, 1]]]))
    text = format_table([step_metrics(cm, 0, 2)], "t")
    assert "0-1" in text and "all" in text


def test_class_errors_by_hand():
    from ciss.metrics import class_errors, format_class_errors

    label = torch.tensor([[[0, 0, 1, 1], [2, 2, IGNORE, 1]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 1]]])
    cm = ConfusionMatrix(4)
    cm.update(pred, label)
    m = step_metrics(cm, 0, 4, ["bg", "a", "b", "c"])
    assert m.as_dict()["confusion"] == cm.mat.tolist()  # recorded with the figures
    rows = class_errors(m.confusion, m.class_names)
    bg, a, b, c = rows
    assert (bg["recall"], bg["precision"]) == (0.5, 0.5)
    assert bg["missed_as"] == [("a", 0.5)] and bg["false_from"] == [("b", 0.5)]
    assert (a["recall"], a["precision"], a["pixels"], a["predicted"]) == (1.0, 0.75, 3, 4)
    assert a["missed_as"] == [] and a["false_from"] == [("bg", 0.25)]
    assert b["missed_as"] == [("bg", 0.5)] and b["precision"] == 1.0
    assert math.isnan(c["iou"]) and math.isnan(c["recall"])  # absent from truth and prediction
    text = format_class_errors(rows)
    assert "bg 50%" in text and len(text.splitlines()) == 5


def test_recorded_row_reads_back():
    from ciss.metrics import StepMetrics

    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[[0, 1, 1]]]), torch.tensor([[[0, 1, 0]]]))
    m = step_metrics(cm, 2, 2, ["bg", "a", "b"])  # class b absent: NaN IoU, None in the row
    back = StepMetrics.from_dict(m.as_dict())
    assert back.as_dict()["iou"] == m.as_dict()["iou"] == [0.5, 0.5, None]
    assert (back.step, back.num_base, back.class_names) == (2, 2, ["bg", "a", "b"]) and math.isnan(back.iou[2]) and back.confusion == cm.mat.tolist()
