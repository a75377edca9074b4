"""Per-request sampling parameters, validated once at arrival.

Validation lives here rather than in the sampler so that a bad request is rejected before it
takes a slot in a batch; the sampler can then trust every value it turns into a tensor.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

# Temperatures below this are treated as greedy: dividing by them would overflow float32.
GREEDY_TEMPERATURE_EPS = 1e-5
# Upper bound on requested top logprobs; keeps the per-step top-k over the vocabulary small.
MAX_LOGPROBS = 20


class RequestOutputKind(enum.Enum):
    """Which steps hand the caller a RequestOutput (vLLM's names)."""
    CUMULATIVE = "cumulative"  # every step that adds a token: everything so far (streaming)
    FINAL_ONLY = "final_only"  # once, when the request finishes (offline batches, non-streaming HTTP)


def sequence_seed(seed: int, index: int) -> int:
    """The seed of completion ``index`` of a request seeded ``seed``: consecutive, wrapping within the 64
    bits a generator takes, so every valid seed gives ``n`` valid ones."""
    return (seed + index) % 2**64


def _is_int(value: object) -> bool:
    # bool is an int subclass, but True as a count or a seed is almost certainly a bug.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _check(ok: bool, name: str, requirement: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {requirement}, got {value!r}")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 disables top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # Top logprobs to return besides the sampled token's; 0 returns only the sampled token's.
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # FINAL_ONLY spares the engine a snapshot of every request every step (it copies all tokens so far).
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        self._normalise_stop()
        self._validate_counts()
        self._validate_distribution()
        self._validate_penalties()
        self._validate_misc()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def has_penalties(self) -> bool:
        """Sampling reads the request's earlier tokens (repetition, presence or frequency penalty)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    def _normalise_stop(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        ok = all(isinstance(s, str) and s for s in self.stop)
        _check(ok, "stop", "a non-empty string or a list of non-empty strings", self.stop)

    def _validate_counts(self) -> None:
        _check(_is_int(self.n) and self.n >= 1, "n", ">= 1", self.n)
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", ">= 1", self.max_tokens)
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", ">= 0", self.min_tokens)
        _check(
            self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"<= max_tokens ({self.max_tokens})",
            self.min_tokens,
        )

    def _validate_distribution(self) -> None:
        t, p, k, mp = self.temperature, self.top_p, self.top_k, self.min_p
        _check(_is_real(t) and t >= 0 and math.isfinite(t), "temperature", ">= 0", t)
        _check(_is_real(p) and 0 < p <= 1, "top_p", "in (0, 1]", p)
        _check(_is_int(k) and (k == -1 or k >= 0), "top_k", "-1 (off) or >= 0", k)
        _check(_is_real(mp) and 0 <= mp <= 1, "min_p", "in [0, 1]", mp)

    def _validate_penalties(self) -> None:
        rp = self.repetition_penalty
        # Logits are divided by it: below 0.01 they overflow to inf and sampling yields NaN.
        _check(_is_real(rp) and 0.01 <= rp <= 100, "repetition_penalty", "in [0.01, 100]", rp)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_real(value) and -2 <= value <= 2, name, "in [-2, 2]", value)

    def _validate_misc(self) -> None:
        # torch's generators take 64-bit seeds, signed or unsigned.
        _check(self.seed is None or (_is_int(self.seed) and -2**63 <= self.seed < 2**64), "seed",
               "None or an int in [-2**63, 2**64)", self.seed)
        lp = self.logprobs
        _check(
            lp is None or (_is_int(lp) and 0 <= lp <= MAX_LOGPROBS),
            "logprobs",
            f"None or an int in [0, {MAX_LOGPROBS}]",
            lp,
        )
        ids = self.stop_token_ids
        ok = isinstance(ids, (list, tuple)) and all(_is_int(t) and t >= 0 for t in ids)
        _check(ok, "stop_token_ids", "a list of non-negative ints", ids)
        self.stop_token_ids = list(ids)
        _check(isinstance(self.output_kind, RequestOutputKind), "output_kind", "a RequestOutputKind",
               self.output_kind)
