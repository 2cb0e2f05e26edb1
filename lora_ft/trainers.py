"""Small, shared adjustments to the upstream trainers."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def ordered_eval(trainer_cls):
    """`trainer_cls` whose evaluation keeps dataset order.

    transformers also length-groups the *eval* batches when train_sampling_strategy is group_by_length,
    which permutes predictions relative to the rows; our metrics and eval_predictions.jsonl pair each
    prediction with its row (texts, SQuAD references), so evaluation must stay sequential.
    """

    class OrderedEval(trainer_cls):
        def _get_eval_sampler(self, eval_dataset):
            from torch.utils.data import SequentialSampler

            if eval_dataset is None:
                return None
            return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None

    OrderedEval.__name__ = OrderedEval.__qualname__ = f"Ordered{trainer_cls.__name__}"
    return OrderedEval
