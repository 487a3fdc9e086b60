"""What a reversible training step keeps from its forward for its backward, within one budget of bytes.

The reversible backward runs each layer's forward again to rebuild its inputs
and its intermediate values. Two things can stand in for parts of that
recompute (`reversible_keep_attention`):
- a layer's attention: its fused kernel's output, log-sum-exps and plan
  (`fused_chunks.KernelReplay`), read instead of running the kernel again;
- a layer's feed-forward output G(Y1) (`KeptOutput`): the backward subtracts
  it to rebuild X2 = Y2 - G(Y1), and needs only the feed-forward's first
  product and activation for the gradients, not its second product.

The backward reaches the last layers first, and there what a layer kept stands
in for what its recompute would build anyway, while an early layer's is held
through the whole backward; so the latest layers keep. Attention comes first:
an attention that needs room evicts the kept feed-forward outputs (earliest
first), then the earliest kept attention; a feed-forward output takes only
what the attention leaves, evicting earlier outputs. So the attention kept is
the same as if no output were kept. Anything larger than the whole budget
keeps nothing.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Protocol

import torch


class Holder(Protocol):
    def give_up(self) -> None: ...  # drop what it keeps, and never keep again


@dataclass
class KeepBudget:
    """The bytes a step may keep, shared by its layers' holders. `kept` lists the bytes of every layer's kept
    attention, `kept_outputs` of every kept feed-forward output, each in forward order."""

    limit: float = math.inf  # bytes; math.inf: keep everything
    _held: list[tuple[int, bool, weakref.ref]] = field(default_factory=list, repr=False)  # (bytes, attention?, holder)

    @property
    def kept(self) -> list[int]:
        return [nbytes for nbytes, attention, _ in self._held if attention]

    @property
    def kept_outputs(self) -> list[int]:
        return [nbytes for nbytes, attention, _ in self._held if not attention]

    def take(self, holder: Holder, nbytes: int) -> bool:
        """Make room for `nbytes` of a layer's attention; False if it cannot fit."""
        return self._take(holder, nbytes, attention=True)

    def take_output(self, holder: Holder, nbytes: int) -> bool:
        """Make room for `nbytes` of a layer's feed-forward output, evicting earlier outputs only; False if the
        attention kept leaves too little."""
        return self._take(holder, nbytes, attention=False)

    def _take(self, holder: Holder, nbytes: int, attention: bool) -> bool:
        kept_attention = sum(self.kept)
        if nbytes + (0 if attention else kept_attention) > self.limit:
            return False
        while sum(entry[0] for entry in self._held) + nbytes > self.limit:
            outputs = [entry for entry in self._held if not entry[1]]
            evicted = (outputs or self._held)[0]  # an attention evicts outputs first, an output outputs only
            self._held.remove(evicted)
            gone = evicted[2]()
            if gone is not None:
                gone.give_up()
        self._held.append((nbytes, attention, weakref.ref(holder)))
        return True


@dataclass(eq=False)
class KeptOutput:
    """One layer's feed-forward output G(Y1) (b, n, d) from the forward, for its reversible backward: handed out
    once, or given up when the budget needs the room."""

    budget: KeepBudget = field(default_factory=KeepBudget)
    output: torch.Tensor | None = None
    declined: bool = False

    def reserve(self, like: torch.Tensor) -> torch.Tensor | None:
        """A tensor shaped as `like` for the forward to fill, when the budget makes room for it; else None."""
        if self.declined or not self.budget.take_output(self, like.nbytes):
            self.give_up()
            return None
        self.output = torch.empty_like(like)
        return self.output

    def take(self) -> torch.Tensor | None:
        """The kept output (once), or None."""
        output, self.output, self.declined = self.output, None, True
        return output

    def give_up(self) -> None:
        self.output, self.declined = None, True
