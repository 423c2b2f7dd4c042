"""Stop strings matched as text streams in, at a cost per character that does not grow with their number.

An Aho-Corasick automaton over the stop strings: its state after each character is the longest suffix
of the text so far that begins some stop string, which is both what a streaming response must hold
back (it may yet become a stop string) and where the next character continues the match. Each choice
keeps one integer; the automaton is built once per distinct list of stop strings and shared.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self._goto: list[dict[str, int]] = [{}]
        self._fail: list[int] = [0]
        self._depth: list[int] = [0]
        self._match: list[int] = [0]  # length of the longest stop string ending at this state (0: none)
        for stop in stops:
            self._insert(stop)
        self._link()

    def _insert(self, stop: str) -> None:
        state = 0
        for ch in stop:
            nxt = self._goto[state].get(ch)
            if nxt is None:
                nxt = len(self._goto)
                self._goto.append({})
                self._fail.append(0)
                self._depth.append(self._depth[state] + 1)
                self._match.append(0)
                self._goto[state][ch] = nxt
            state = nxt
        self._match[state] = max(self._match[state], len(stop))

    def _link(self) -> None:
        queue = deque(self._goto[0].values())
        while queue:
            state = queue.popleft()
            for ch, nxt in self._goto[state].items():
                queue.append(nxt)
                fallback = self._fail[state]
                while fallback and ch not in self._goto[fallback]:
                    fallback = self._fail[fallback]
                target = self._goto[fallback].get(ch, 0)
                self._fail[nxt] = target if target != nxt else 0
                self._match[nxt] = max(self._match[nxt], self._match[self._fail[nxt]])

    def feed(self, state: int, text: str) -> tuple[int, tuple[int, int] | None]:
        """Advance `state` over `text`. Returns the new state and, if a stop string completed, (end,
        length): it ends just before text[end] and is `length` characters long (it may begin in text
        fed earlier). The longest stop string ending at the first such place wins."""
        goto, fail, match = self._goto, self._fail, self._match
        for i, ch in enumerate(text):
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            if match[state]:
                return state, (i + 1, match[state])
        return state, None

    def held(self, state: int) -> int:
        """Characters at the end of the text that may still become a stop string."""
        return self._depth[state]


@functools.lru_cache(maxsize=64)
def stop_matcher(stops: tuple[str, ...]) -> StopMatcher | None:
    """The shared automaton for a tuple of stop strings; None when there are none."""
    stops = tuple(s for s in stops if s)
    return StopMatcher(stops) if stops else None
