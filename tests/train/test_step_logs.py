"""``StepLogs``: a step's values stay tensors until the first read, which reads every pending value at once."""

from __future__ import annotations

import pytest
import torch

from appleswap.train.step_logs import StepLogs


def test_values_stay_tensors_until_a_read_which_reads_them_all():
    logs = StepLogs({"loss/fm": torch.tensor(0.25), "grad_norm": torch.tensor([1.5])})
    logs["gated"] = 0.5  # a host value: reading it waits for nothing
    assert logs.unread == ["loss/fm", "grad_norm"] and logs["gated"] == 0.5 and len(logs.unread) == 2
    assert logs["loss/fm"] == 0.25 and logs.unread == []  # one read brought both device values over
    assert dict(logs) == {"loss/fm": 0.25, "grad_norm": 1.5, "gated": 0.5}
    assert all(type(value) is float for value in logs.values())


def test_a_value_set_after_a_read_is_read_on_the_next():
    logs = StepLogs({"a": torch.tensor(1.0)})
    assert logs.read() == {"a": 1.0}
    logs["b"] = torch.tensor(2.0, dtype=torch.bfloat16)
    assert logs.unread == ["b"] and logs.get("b") == 2.0 and logs.get("missing") is None
    del logs["a"]
    assert list(logs) == ["b"] and len(logs) == 1
    with pytest.raises(KeyError):
        logs["a"]
