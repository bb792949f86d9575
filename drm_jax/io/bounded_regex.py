"""Regular expressions read from checkpoints, matched in bounded time (PEFT's `rank_pattern` / `alpha_pattern`).

Python's `re` backtracks: `(.*)*Z` against a 60-character module name runs for hours. A `BoundedPattern`
parses the pattern with Python's own parser (so the syntax and the meaning are `re`'s: classes, flags,
anchors, counted repeats) and matches it as `re.match` would, by simulating its automaton over sets of
states (Thompson's construction), each set-to-set step memoised (a lazily built DFA). A name of n
characters costs at most n steps over at most `MAX_STATES` states, whatever the pattern; a match that
would do more than `MAX_WORK` state visits is refused. Constructs no automaton matches (backreferences,
lookarounds, atomic groups, possessive repeats, conditionals), patterns longer than `MAX_PATTERN`
characters and patterns of more than `MAX_STATES` states once counted repeats are written out raise
`PatternError`.
"""

from __future__ import annotations

import re

try:  # Python 3.11+
    from re import _compiler as _sre_compile, _constants as _sre, _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_compile as _sre_compile  # type: ignore[no-redef]
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

MAX_PATTERN = 1000  # characters of one pattern
MAX_STATES = 5000  # automaton states, counted repeats written out
MAX_WORK = 2_000_000  # state visits of one match (memoised steps cost one)
_MAX_STEPS_CACHED = 100_000

_CHAR, _SPLIT, _ASSERT, _MATCH = range(4)
_CONSUMING = (_sre.LITERAL, _sre.NOT_LITERAL, _sre.ANY, _sre.IN)


class PatternError(ValueError):
    """A pattern that cannot be matched in bounded time or memory (the message says why)."""


class BoundedPattern:
    """`re.match(pattern, text) is not None`, in time linear in len(text) (module docstring)."""

    def __init__(self, pattern: str):
        if len(pattern) > MAX_PATTERN:
            raise PatternError(f"longer than {MAX_PATTERN} characters")
        try:
            parsed = _sre_parse.parse(pattern, 0)
        except (re.error, RecursionError, OverflowError) as err:
            raise PatternError(f"not a valid pattern: {err}") from None
        self.kind: list[int] = []
        self.arg: list = []
        self.out: list[list[int]] = []
        self.accept = self._node(_MATCH, None, [])
        self.start = self._sequence(parsed, self.accept, parsed.state.flags)
        self.asserts = [s for s, k in enumerate(self.kind) if k == _ASSERT]
        self._assert_slot = {s: j for j, s in enumerate(self.asserts)}
        self._steps: dict = {}

    # -- building the automaton ----------------------------------------------------------------------------
    def _node(self, kind: int, arg, out: list[int]) -> int:
        if len(self.kind) >= MAX_STATES:
            raise PatternError(f"more than {MAX_STATES} states once its counted repeats are written out")
        self.kind.append(kind)
        self.arg.append(arg)
        self.out.append(out)
        return len(self.kind) - 1

    @staticmethod
    def _single(item, flags: int) -> re.Pattern:
        """One character class or one anchor as its own `re` pattern: `re`'s exact meaning, in O(1)."""
        state = _sre_parse.State()
        state.flags = flags
        return _sre_compile.compile(_sre_parse.SubPattern(state, [item]), flags)

    def _sequence(self, items, after: int, flags: int) -> int:
        for item in reversed(list(items)):
            after = self._item(item, after, flags)
        return after

    def _item(self, item, after: int, flags: int) -> int:
        op, av = item
        if op in _CONSUMING:
            return self._node(_CHAR, self._single(item, flags), [after])
        if op is _sre.AT:
            return self._node(_ASSERT, self._single(item, flags), [after])
        if op is _sre.BRANCH:
            return self._node(_SPLIT, None, [self._sequence(alt, after, flags) for alt in av[1]])
        if op is _sre.SUBPATTERN:
            _group, add, delete, body = av
            return self._sequence(body, after, (flags | add) & ~delete)
        if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT):  # greedy or lazy: the same set of matches
            low, high, body = av
            if low > MAX_STATES or (high is not _sre.MAXREPEAT and high > MAX_STATES):
                raise PatternError(f"a repeat count above {MAX_STATES}")
            if high is _sre.MAXREPEAT:
                start = self._node(_SPLIT, None, [])
                self.out[start] = [self._sequence(body, start, flags), after]
            else:
                start = after
                for _ in range(high - low):
                    start = self._node(_SPLIT, None, [self._sequence(body, start, flags), after])
            for _ in range(low):
                start = self._sequence(body, start, flags)
            return start
        raise PatternError(f"uses {str(op).lower()} (backreferences, lookarounds, atomic groups, possessive "
                           f"repeats and conditionals have no bounded-time match)")

    # -- matching ------------------------------------------------------------------------------------------
    def _closure(self, states, where: tuple[bool, ...]) -> tuple[frozenset, int]:
        """The states reachable without reading a character (anchors decided by `where`), and the work."""
        seen: set[int] = set()
        stack = list(states)
        kept = []
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            kind = self.kind[s]
            if kind == _SPLIT:
                stack.extend(self.out[s])
            elif kind == _ASSERT:
                if where[self._assert_slot[s]]:
                    stack.extend(self.out[s])
            else:
                kept.append(s)
        return frozenset(kept), len(seen)

    def _where(self, text: str, i: int) -> tuple[bool, ...]:
        return tuple(self.arg[s].match(text, i) is not None for s in self.asserts)

    def match(self, text: str) -> bool:
        """Whether the pattern matches at the start of `text` (`re.match`); PatternError past MAX_WORK."""
        current, work = self._closure([self.start], self._where(text, 0))
        for i, ch in enumerate(text):
            if self.accept in current:
                return True
            if not current:
                return False
            where = self._where(text, i + 1)
            key = (current, ch, where)
            following = self._steps.get(key)
            work += 1 + len(where)
            if following is None:
                moved = [self.out[s][0] for s in current if self.kind[s] == _CHAR and self.arg[s].match(ch)]
                following, cost = self._closure(moved, where)
                work += len(current) + cost
                if len(self._steps) >= _MAX_STEPS_CACHED:
                    self._steps.clear()
                self._steps[key] = following
            if work > MAX_WORK:
                raise PatternError(f"matching a name of {len(text)} characters needs more than {MAX_WORK} steps")
            current = following
        return self.accept in current


__all__ = ["BoundedPattern", "PatternError"]
