"""CLI progress bars follow the stages' own log lines (as Ray forwards them: prefixed with the actor)."""

import io

from flows.progress import StageProgress


def test_bars_follow_shard_and_step_lines():
    out = io.StringIO()
    progress = StageProgress(stream=out, enabled=True)
    progress.feed("[TeacherReplica pid=1] teacher: train shard 2/3: 8 rows, 90 tokens [replica 1]")
    progress.feed("[TeacherReplica pid=2] teacher: train shard 1/3 already complete, skipped [replica 0]")
    progress.feed("[RayTrainWorker pid=3] train: step 1/6 loss 2.5000 fkl 2.0000 ce 0.5000 | 1200 tok/s, eta 5s")
    progress.feed("[RayTrainWorker pid=3] train: step 4/6 loss 1.2500 fkl 1.0000 ce 0.2500 | 1300 tok/s, eta 2s")
    progress.feed("vLLM: some unrelated line")
    assert progress.bars["teacher train"].n == 2 and progress.bars["teacher train"].total == 3
    assert progress.bars["train"].n == 4 and progress.bars["train"].total == 6
    progress.feed("[RayTrainWorker pid=3] train: step 6/6 loss 1.0000 | 1250 tok/s, eta 0s")
    progress.close()
    text = out.getvalue()
    assert "teacher train" in text and "6/6" in text and "loss=1" in text and "tok/s=1250" in text


def test_no_bars_when_disabled():
    out = io.StringIO()
    progress = StageProgress(stream=out)  # a StringIO is not a terminal
    progress.feed("train: step 1/6 loss 2.5 | 10 tok/s")
    progress.close()
    assert out.getvalue() == "" and not progress.bars
