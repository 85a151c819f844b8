"""Batches: windows of a TokenSplit, as the tensors the model takes.

    RandomWindowBatches(split, B, T)    random training windows, resumable from the step counter
    iter_eval_batches(split, B, T)      fixed, non-overlapping windows for validation

Windows are cut anywhere in the split's stream of documents, as in nanoGPT; with
`document_positions=True` the batches also carry position ids that restart at each boundary token,
for document-masked attention.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from training.data.shards import TokenSplit


class RandomWindowBatches:
    """Endless training batches of random windows, the same for any number of processes.

    Step s draws the window starts of the *global* batch (world_size * batch_size rows) from a
    numpy Generator seeded with (seed, s); rank r keeps rows [r*B, (r+1)*B). So a batch depends only
    on the step, the state to resume is just the step counter, and 2 processes of B rows see
    exactly the rows that 1 process of 2B rows would.

    Each batch is {"input_ids", "labels"} of shape (B, T), labels being the next tokens, plus
    "position_ids" (B, T) restarting at 0 at every boundary token when document_positions is set.
    """

    def __init__(self, split: TokenSplit, batch_size: int, seq_len: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, document_positions: bool = False, pin_memory: bool = False):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        _check_long_enough(split, seq_len)
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.document_positions = document_positions
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.step = 0

    def __iter__(self) -> "RandomWindowBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        # The last window may end at the split's last token: starts in [0, num_tokens - T - 1].
        starts = rng.integers(0, self.split.num_tokens - self.seq_len, size=self.world_size * self.batch_size)
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        rows = np.stack([self.split.read(int(s), int(s) + self.seq_len + 1) for s in mine])
        return _make_batch(rows, self.split.boundary_token_id, self.document_positions, self.pin_memory)

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"this state was saved with seed {state['seed']}, but these batches use "
                             f"seed {self.seed}: resuming would change the data order")
        self.step = int(state["step"])


def iter_eval_batches(split: TokenSplit, batch_size: int, seq_len: int, max_tokens: int | None = None,
                      rank: int = 0, world_size: int = 1, *,
                      document_positions: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Fixed validation batches: window w covers tokens [w*T, w*T + T] (inputs and their labels).

    The windows do not overlap in what they predict, so every token after the first is scored
    once. Window w belongs to rank w % world_size, so together the ranks cover each window exactly
    once. The window count is rounded down to a multiple of world_size so every rank runs the same
    number of batches: a wrapped (DDP/FSDP) model may synchronise inside forward, and a rank with
    one batch more would wait forever. `max_tokens` caps the predicted tokens.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    _check_long_enough(split, seq_len)
    windows = (split.num_tokens - 1) // seq_len
    if max_tokens is not None:
        windows = min(windows, max(1, max_tokens // seq_len))
    if windows < world_size:
        raise ValueError(f"the {split.name} split holds {windows} windows of {seq_len} tokens, fewer than "
                         f"the {world_size} processes: use a shorter seq_len or more validation data")
    windows -= windows % world_size
    mine = range(rank, windows, world_size)

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for first in range(0, len(mine), batch_size):
            rows = np.stack([split.read(w * seq_len, w * seq_len + seq_len + 1)
                             for w in mine[first:first + batch_size]])
            yield _make_batch(rows, split.boundary_token_id, document_positions, pin_memory=False)

    return batches()


def _check_long_enough(split: TokenSplit, seq_len: int) -> None:
    if split.num_tokens < seq_len + 1:
        raise ValueError(f"the {split.name} split has {split.num_tokens} tokens, fewer than seq_len + 1 = "
                         f"{seq_len + 1}: use a shorter seq_len or more data")


def _make_batch(rows: np.ndarray, boundary: int, document_positions: bool, pin_memory: bool) -> dict[str, torch.Tensor]:
    """(B, T+1) token windows -> input_ids, labels (and position_ids), int64 tensors of (B, T)."""
    rows = rows.astype(np.int64)
    batch = {"input_ids": torch.from_numpy(np.ascontiguousarray(rows[:, :-1])),
             "labels": torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))}
    if document_positions:
        inputs = rows[:, :-1]
        index = np.arange(inputs.shape[1], dtype=np.int64)
        # Position = distance to the latest boundary at or before it (or to the window start).
        last_boundary = np.maximum.accumulate(np.where(inputs == boundary, index, 0), axis=1)
        batch["position_ids"] = torch.from_numpy(index - last_boundary)
    if pin_memory:
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch
