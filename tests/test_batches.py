"""Labels land at the shifted-logit index that predicts each response token."""

import numpy as np
import torch

from tasks.train.batches import collate


def test_collate_alignment_and_padding():
    rec = lambda p, r, k: {"prompt_ids": np.array(p), "response_ids": np.array(r),
                           "topk_ids": np.arange(len(r) * k).reshape(len(r), k) + 100,
                           "topk_logprobs": np.full((len(r), k), -1.0, dtype=np.float32),
                           "tail_logmass": np.full(len(r), -2.0, dtype=np.float32)}
    b = collate([rec([1, 2, 3], [7, 8], 2), rec([1, 2], [9, 10, 11], 2)], pad_id=0, k=2)
    assert b["input_ids"].tolist() == [[1, 2, 3, 7, 8], [1, 2, 9, 10, 11]]
    assert b["mask"].tolist() == [[False, False, True, True], [False, True, True, True]]
    # shifted logits at index i predict input_ids[i + 1]
    assert torch.equal(b["target_ids"][b["mask"]], b["input_ids"][:, 1:][b["mask"]])
    assert b["ids"][0, 2].tolist() == [100, 101] and b["ids"][1, 3].tolist() == [104, 105]
    assert torch.isinf(b["tail_logmass"][0, 0]) and b["tail_logmass"][0, 2] == -2.0
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
