"""The step a stage passes on to the next: every field of the incoming Step is either passed on, replaced or reset,
by a rule written once (`compute.PASSED_ON`, `REPLACED`, `RESET`), so a field added to the message is a decision,
not a silent omission."""

from __future__ import annotations

from layerline.stage_server import compute
from layerline.v1 import stage_pb2, tensor_pb2
from layerline.wire_format import int64_column, int64_rows


def test_every_field_of_a_step_has_a_rule():
    fields = {f.name for f in stage_pb2.Step.DESCRIPTOR.fields}
    rules = [compute.PASSED_ON, compute.REPLACED, compute.RESET]
    assert set().union(*rules) == fields, fields.symmetric_difference(set().union(*rules))
    assert sum(len(r) for r in rules) == len(fields)  # each field one rule


def test_the_onward_step_carries_what_was_passed_on_and_this_stages_output():
    step = stage_pb2.Step(
        session_id="here",
        seq=7,
        positions=int64_rows([[3, 4]]),
        tokens=int64_rows([[10, 11]]),
        hidden=tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[1, 2, 1], data=b"\0" * 8),
        rows=[0],
        sample=True,
        sampling=stage_pb2.SamplingParams(temperature=0.5, seed=3, draws=2),
        truncate=3,
        loop=stage_pb2.Loop(address="127.0.0.1:1", session_id="first", max_new_tokens=5),
        looped=True,
        targets=int64_rows([[11, 12]]),
        burst=4,
        client_key="k" * 24,
    )
    sent = stage_pb2.Step()
    sent.CopyFrom(step)
    hidden = int64_column([1, 2])  # any tensor: this stage's output
    onward = compute.onward_step(step, "there", hidden)
    assert onward.session_id == "there" and onward.hidden == hidden and onward.burst == 0
    for name in compute.PASSED_ON:
        assert getattr(onward, name) == getattr(sent, name), name
