"""What reaches the run log from Ray workers: prefixed lines, no autoscaler status dumps, no doubled batches."""

from tasks.ray_logs import RunLogFilter, format_batch


def test_lines_are_prefixed_with_the_writer_and_blank_lines_dropped():
    data = {"actor_name": "TeacherReplica", "pid": 7, "lines": ["teacher: shard 1/2", "  "]}
    assert format_batch(data) == ["[TeacherReplica pid=7] teacher: shard 1/2"]
    assert format_batch({"pid": 8, "lines": ["x"]}) == ["[ray worker pid=8] x"]


def test_autoscaler_status_is_dropped_but_its_warnings_kept():
    f = RunLogFilter()
    assert not f.keep({"pid": "autoscaler", "lines": ["======== Autoscaler status ========", " 1.0/2.0 CPU"]})
    assert f.keep({"pid": "autoscaler", "lines": ["2026 WARNING autoscaler.py -- node launch failed"]})


def test_a_batch_repeated_by_the_same_process_is_dropped_once():
    f = RunLogFilter()
    step1 = {"actor_name": "RayTrainWorker", "pid": 5, "lines": ["train: step 1/3 loss 2.0"]}
    assert f.keep(step1)
    assert not f.keep(dict(step1))  # Ray Train's doubled copy
    assert f.keep({"actor_name": "TeacherReplica", "pid": 6, "lines": ["train: step 1/3 loss 2.0"]})  # another process
    assert f.keep({"actor_name": "RayTrainWorker", "pid": 5, "lines": ["train: step 2/3 loss 1.5"]})
    assert f.keep(dict(step1))  # not a consecutive repeat any more
