"""`experiments.trace_ops`: reading calls and device events back from a profiler trace."""

from experiments import trace_ops


def _events():
    host = dict(process="/host:CPU", thread="python")
    dev = dict(process="/device:GPU:0", thread="Stream #7")
    return [
        dict(host, name="trace_ops:forward #1", ts=100.0, dur=500.0),
        dict(dev, name="wy_prepare", ts=130.0, dur=200.0),
        dict(dev, name="chunk_fwd", ts=340.0, dur=100.0),
        dict(dev, name="later", ts=700.0, dur=10.0),            # after the call: not counted
        dict(host, name="unrelated", ts=120.0, dur=5.0),
        dict(host, name="$profiler.py:307 trace", ts=110.0, dur=50.0),
    ]


def test_calls_and_kernels_offsets_and_summary():
    (call,) = trace_ops.calls_and_kernels(_events())
    assert call["label"] == "forward #1" and call["wall_us"] == 500.0
    assert [(k["name"], k["start_us"], k["dur_us"]) for k in call["kernels"]] == [
        ("wy_prepare", 30.0, 200.0), ("chunk_fwd", 240.0, 100.0)]
    text = trace_ops.describe(call)
    assert "(gap    10.0)  chunk_fwd" in text
    assert "device busy 300.0 us; first kernel after 30.0 us; last ends at 340.0 us; host returns 160.0 us later" in text
    assert [(e["name"], e["start_us"]) for e in call["host"]] == [("unrelated", 20.0)]  # Python frames left out
    assert "+     20.0 us       5.0 us  [python]  unrelated" in text


def test_host_only_trace_end_to_end(tmp_path):
    calls = trace_ops.main(["--shape", "1x64x1x16", "--calls", "1", "--out", str(tmp_path)])
    assert [c["label"] for c in calls] == ["forward #1", "forward+backward #1"]
    assert all(c["wall_us"] > 0 for c in calls)
