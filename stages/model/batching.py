"""Turning token-id lists into the padded tensors the model and the loss take."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.model.generation import left_pad, pad_rows


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_rows(sequences, max(1, max(len(s) for s in sequences)), pad_id)


@dataclass
class CompletionBatch:
    """Prompts left-padded and completions right-padded, so every completion starts at one column."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor

    @classmethod
    def from_lists(cls, prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> CompletionBatch:
        prompt_ids, prompt_mask = left_pad(prompts, pad_id)
        completion_ids, completion_mask = right_pad(completions, pad_id)
        return cls(prompt_ids, prompt_mask, completion_ids, completion_mask)

    def to(self, device: torch.device) -> CompletionBatch:
        return CompletionBatch(*(t.to(device) for t in vars(self).values()))

    def as_inputs(self) -> tuple[torch.Tensor, ...]:
        return self.prompt_ids, self.prompt_mask, self.completion_ids, self.completion_mask


def pad_to(rows: list[list[float]], width: int, value: float = 0.0) -> torch.Tensor:
    if any(len(row) > width for row in rows):
        rows = [row[:width] for row in rows]
    return pad_rows(rows, width, value, dtype=torch.float32)[0]
