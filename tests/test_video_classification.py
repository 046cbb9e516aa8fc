"""Video classification: clip scores averaged per video against a slow loop, per-video scores of a model over
batches of several clips, the task's checks, and a short training run on moving squares where divided attention
learns the direction and space-only attention (which sees a clip as an unordered set of frames) cannot."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlkit.errors import VlkitError
from vlkit.metrics.classification import classification_metrics
from vlkit.models.registry import create_model
from vlkit.tasks import TASKS, build_task
from vlkit.tasks.video_classification import (average_clip_scores, collect_scores, require_video_classifier,
                                              video_scores)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_average_clip_scores_equals_a_loop_over_videos():
    torch.manual_seed(0)
    scores = torch.randn(7, 4)
    clip_video = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    out = average_clip_scores(scores, clip_video, 3)
    for v in range(3):
        rows = [scores[i].softmax(-1) for i in range(7) if int(clip_video[i]) == v]
        torch.testing.assert_close(out[v], sum(rows) / len(rows))
    with pytest.raises(VlkitError, match="video 3"):
        average_clip_scores(scores, clip_video, 4)


def test_video_scores_average_the_clips_of_each_video():
    torch.manual_seed(1)
    model = create_model("timesformer-tiny", frames=4, num_classes=3).eval()
    clips = torch.randn(6, 4, 3, 32, 32)  # 3 videos x 2 clips, video by video
    batches = [
        {"video": clips[:4], "clip_video": torch.tensor([0, 0, 1, 1]), "index": torch.tensor([5, 2]),
         "id": ["e", "b"], "label": torch.tensor([1, 0])},
        {"video": clips[4:], "clip_video": torch.tensor([0, 0]), "index": torch.tensor([0]), "id": ["a"],
         "label": torch.tensor([2])},
    ]
    got = collect_scores(video_scores(model, batches, torch.device("cpu")))
    assert got.index.tolist() == [0, 2, 5] and got.ids == ["a", "b", "e"] and got.labels.tolist() == [2, 0, 1]
    with torch.no_grad():
        probs = [model(clips[i:i + 1])[0].softmax(-1) for i in range(6)]
    expected = torch.stack([(probs[4] + probs[5]) / 2, (probs[2] + probs[3]) / 2, (probs[0] + probs[1]) / 2])
    torch.testing.assert_close(got.scores, expected, atol=1e-5, rtol=1e-5)


def test_task_is_registered_and_checks_the_model():
    with pytest.raises(VlkitError):
        build_task("no-such-task")  # loads the built-in tasks
    assert "video_classification" in TASKS
    model = create_model("timesformer-tiny", frames=16, num_classes=5)
    assert require_video_classifier(model, 5, "task") == 16
    with pytest.raises(VlkitError, match="num_classes=8"):
        require_video_classifier(model, 8, "task")
    with pytest.raises(VlkitError, match="video classifier"):
        require_video_classifier(torch.nn.Linear(2, 2), 2, "task")


def moving_squares(n: int, seed: int, frames: int = 4, size: int = 24, side: int = 6, step: int = 5):
    """``n`` clips of a white square moving right (label 1) or left (label 0) on black, and their labels.

    A left-moving square passes the same places as a right-moving one started at the other end: the two
    classes hold the same frames in opposite orders.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    travel = step * (frames - 1)
    x0 = torch.randint(0, size - side - travel + 1, (n,), generator=g)
    y0 = torch.randint(0, size - side + 1, (n,), generator=g)
    video = torch.zeros(n, frames, 3, size, size)
    for i in range(n):
        for t in range(frames):
            x = int(x0[i]) + (step * t if labels[i] == 1 else travel - step * t)
            video[i, t, :, y0[i]:y0[i] + side, x:x + side] = 1.0
    return video - 0.5, labels


def _train_and_test(attention: str, train, test, steps: int = 200) -> float:
    torch.manual_seed(0)
    model = create_model("timesformer-tiny", attention=attention, num_classes=2, frames=4, image_size=24,
                         patch_size=6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    video, labels = train
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (32,), generator=g)
        loss = F.cross_entropy(model(video[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return classification_metrics(model(test[0]), test[1]).top1


@pytest.mark.slow  # about 45 s on 2 cores: two models trained for 200 steps
def test_divided_attention_tells_left_from_right_and_space_only_cannot():
    train, test = moving_squares(512, 0), moving_squares(128, 1)
    # space-only attention is blind to frame order: a clip and its reverse score the same
    model = create_model("timesformer-tiny", attention="space", num_classes=2, frames=4, image_size=24,
                         patch_size=6).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(test[0][:4]), model(test[0][:4].flip(1)))
    divided, space = _train_and_test("divided", train, test), _train_and_test("space", train, test)
    assert divided >= 90.0, divided
    assert space <= 65.0, space  # chance is 50 %
    assert divided >= space
