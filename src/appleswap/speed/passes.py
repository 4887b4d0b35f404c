"""The inputs a swap's passes can share, computed once: the seam between the pipeline and the fast forward.

The pipeline calls the model the same way for every speed profile and adds ``**inputs(batch, sigma)`` from
:meth:`SwapPasses.bind`. For the reference model those are empty; for a
:class:`~appleswap.speed.transformer.FastAppleTransformer` they carry what every pass of a swap computes alike: the
prompt embedding, RoPE and the ID keys/values (:class:`~appleswap.speed.transformer.PassConstants`), the
condition's AdaLN rows, the main tokens' rows for the pass's timestep (:class:`~appleswap.speed.steps.StepTable`)
and, in the independent-condition mode, the condition's keys and values (then the pass gets no condition tokens).
"""

from __future__ import annotations

import torch

from appleswap.model.transformer import AppleTransformer, TextEmbeddings
from appleswap.speed.steps import StepTable, call_sigmas
from appleswap.speed.transformer import FastAppleTransformer


class SwapPasses:
    """Per-swap inputs for ``transformer``'s passes with prompt ``text``, and rows kept across swaps."""

    def __init__(self, transformer: AppleTransformer, text: TextEmbeddings, device: torch.device):
        self.transformer, self.text, self.device = transformer, text, device
        self.rows_memo: dict = {}

    @property
    def fast(self) -> bool:
        return isinstance(self.transformer, FastAppleTransformer)

    def step_table(self, sigmas: torch.Tensor, order: int = 1, inverse: bool = False, guidance_scale: float = 1.0,
                   condition: bool = False) -> StepTable | None:
        """The timestep-dependent AdaLN rows for every model call of a solver over ``sigmas``, computed at once;
        with the condition branch's rows beside them when the passes carry ``condition`` tokens. None for the
        reference model (each pass computes its own)."""
        if not self.fast:
            return None
        calls = call_sigmas(sigmas, order, inverse)
        key = ("timesteps", calls.numpy().tobytes(), guidance_scale)
        rows = self._memo(key, lambda: self.transformer.timestep_modulation(calls, self.text, guidance_scale))
        if condition:
            rows = self._memo((*key, "condition"),
                              lambda: self.transformer.joined_modulation(rows, self.condition_rows()))
        return StepTable(rows, calls, self.device)

    def condition_rows(self):
        return self._memo(("condition",), lambda: self.transformer.condition_modulation(self.text))

    def bind(self, condition: torch.Tensor | None, id_tokens: list, positions: torch.Tensor, kv_cache: bool,
             steps: StepTable | None):
        """``inputs(batch, sigma) -> dict`` of extra forward arguments for passes over ``condition`` (the guidance
        variants stacked) and the variants' ``id_tokens`` (a list, one (1 or B, 32, D) per variant, or None)."""
        if not self.fast:
            return lambda batch, sigma: {}
        cache = modulation = None
        if kv_cache and condition is not None:
            cache = self.transformer.build_condition_cache(condition, self.text, positions)
        elif condition is not None:  # the condition's AdaLN rows: constant over the steps (and swaps)
            modulation = self.condition_rows()
        constants = {}  # per batch size: prompt embedding, RoPE and ID keys/values, computed at the first pass

        def inputs(batch: int, sigma: torch.Tensor) -> dict:
            if batch not in constants:
                ids = None if id_tokens is None else torch.cat([i.expand(batch, -1, -1) for i in id_tokens])
                constants[batch] = self.transformer.pass_constants(self.text, positions, ids, cache is None
                                                                   and condition is not None)
            extra = {"id_tokens": None, "constants": constants[batch], "modulation": modulation,
                     "timestep_modulation": None if steps is None else steps(sigma)}
            if cache is not None:
                extra.update(condition=None, condition_cache=cache, independent_condition=False)
            return extra

        return inputs

    def _memo(self, key: tuple, compute):
        """Rows that only the prompt, the schedule and the weights determine, kept for the next swaps (a job of
        many swaps computes them once: ~60 ms of host-bound launches per swap on an H100). The key includes the
        prompt's and the weights' storage and in-place versions, so a changed LoRA or prompt computes anew."""
        pooled = self.text.pooled
        key = (*key, id(self.text), pooled.data_ptr(), pooled._version, self.transformer.modulation_state())
        if key not in self.rows_memo:
            if len(self.rows_memo) >= 8:
                self.rows_memo.pop(next(iter(self.rows_memo)))
            self.rows_memo[key] = compute()
        return self.rows_memo[key]
