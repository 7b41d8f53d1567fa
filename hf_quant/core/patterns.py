"""Regular expressions that come from configs (QuantConfig.dynamic, a GPTQ checkpoint's dynamic
rules) are untrusted input: a pattern such as `^(.+)+!` takes exponential time in Python's `re`,
so a downloaded config.json could stall any loader.

`SafePattern` refuses over-long patterns and nested quantifiers when it is built, and matches with
the `regex` module's timeout, within a time budget per pattern for the whole model, so that even a
pattern these checks miss ends in a clear error naming it.
"""

from __future__ import annotations

import re
import re._parser as _sre  # the stdlib's own parse tree, to find nested quantifiers
import time

import regex

MAX_PATTERN_LENGTH = 512
MATCH_BUDGET_SECONDS = 1.0  # per pattern, over all the module names it is matched against
_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", _sre.MAX_REPEAT)}


def _repeats_inside(items, under_repeat: bool) -> bool:
    """True if a quantifier (max > 1) sits inside another one anywhere in the parsed pattern."""
    for op, arg in items:
        if op in _REPEATS:
            lo, hi, sub = arg
            many = hi == _sre.MAXREPEAT or hi > 1
            if many and under_repeat:
                return True
            if _repeats_inside(sub, under_repeat or many):
                return True
        elif op == _sre.SUBPATTERN:
            if _repeats_inside(arg[-1], under_repeat):
                return True
        elif op == _sre.BRANCH:
            if any(_repeats_inside(b, under_repeat) for b in arg[1]):
                return True
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            if _repeats_inside(arg[1], under_repeat):
                return True
    return False


class SafePattern:
    """A validated pattern; `search` / `match` like `re`, but bounded in time. `field` names where
    the pattern came from in every error (e.g. "QuantConfig.dynamic['^(.+)+!']")."""

    def __init__(self, pattern: str, field: str) -> None:
        if not isinstance(pattern, str):
            raise ValueError(f"{field}: keys must be regex strings.")
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise ValueError(f"{field}: the pattern is {len(pattern)} characters long; at most "
                             f"{MAX_PATTERN_LENGTH} are accepted. Name the modules with a shorter regex.")
        try:
            parsed = _sre.parse(pattern)
            self.regex = regex.compile(pattern)
        except (re.error, regex.error, RecursionError, OverflowError) as e:
            raise ValueError(f"{field}: invalid regex ({e}).") from None
        if _repeats_inside(list(parsed), False):
            raise ValueError(f"{field}: the pattern nests quantifiers (like (a+)+ or (.*)*), which can take "
                             "exponential time on some names; write it with a single quantifier, e.g. '.*' "
                             "instead of '(.+)+'.")
        self.pattern, self.field, self.spent = pattern, field, 0.0

    def _run(self, method, name: str):
        remaining = MATCH_BUDGET_SECONDS - self.spent
        start = time.perf_counter()
        try:
            return method(name, timeout=max(remaining, 1e-3))
        except TimeoutError:
            raise ValueError(f"{self.field}: matching the pattern against the model's module names took more than "
                             f"{MATCH_BUDGET_SECONDS:g} s; simplify the regex.") from None
        finally:
            self.spent += time.perf_counter() - start

    def search(self, name: str) -> bool:
        return self._run(self.regex.search, name) is not None

    def match(self, name: str) -> bool:
        return self._run(self.regex.match, name) is not None

    def __deepcopy__(self, memo: dict) -> SafePattern:
        return self  # immutable but for the time spent, which copies of a config share
