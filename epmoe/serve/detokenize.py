"""Token ids to text, a few at a time, for one request: UTF-8 safe and stop-string aware.

Two layers, both plain Python over a Hugging Face tokenizer:

* :class:`IncrementalDetokenizer` turns the ids of one request into text as
  they arrive. It decodes a short window (vLLM's prefix/read offsets): the
  text of ``ids[prefix:]`` minus the text of ``ids[prefix:read]``, so that
  tokenizers whose decoding depends on the neighbour (SentencePiece's leading
  space) come out right, at a cost per step that does not grow with the
  output. A window whose text ends in U+FFFD is held back: with byte-level
  tokenizers one token can be half of a UTF-8 character, and the next token
  completes it. At the end the whole output is decoded once, and what was not
  yet returned is returned then, so that the pieces joined equal
  ``tokenizer.decode(ids, skip_special_tokens=True)``.
* :class:`TextStream` adds stop strings: the text is cut before the first
  one found (it may span tokens), and while streaming any tail that could
  still become a stop string is held back.

    >>> from epmoe.hf.tiny import _byte_tokenizer
    >>> tok = _byte_tokenizer()                      # token i is byte i
    >>> ids = list("é!".encode())                    # [195, 169, 33]: é is two tokens
    >>> d = IncrementalDetokenizer(tok)
    >>> [d.push([i]) for i in ids] + [d.finish()]
    ['', 'é', '!', '']
    >>> s = TextStream(tok, stop=("END",))
    >>> [s.push(list(b), finished=False) for b in (b"ab E", b"N", b"Dxyz")]
    [('ab ', False), ('', False), ('', True)]
    >>> s.text
    'ab '
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["IncrementalDetokenizer", "TextStream"]

log = logging.getLogger(__name__)

_INCOMPLETE = "\ufffd"  # what a decoder gives for bytes that are not (yet) a whole character


class IncrementalDetokenizer:
    """The text of one request's output ids, returned piece by piece as ids arrive.

    Invariant: ``"".join(every push(...)) + finish() == tokenizer.decode(ids,
    skip_special_tokens=True)`` where ``ids`` are all pushed ids not in ``skip_ids``.
    """

    def __init__(self, tokenizer: Any, skip_ids: Iterable[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.skip_ids = frozenset(skip_ids)  # never text (EOS when it is not a special token)
        self.ids: list[int] = []
        self.text = ""  # returned so far
        self._prefix = 0  # ids[_prefix:_read] is the context window, already returned
        self._read = 0  # ids[_read:] is not returned yet

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def push(self, new_ids: Iterable[int]) -> str:
        """The text that ``new_ids`` complete; '' while a character is still incomplete."""
        self.ids.extend(i for i in new_ids if i not in self.skip_ids)
        if self._read == len(self.ids):
            return ""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith(_INCOMPLETE):
            return ""  # a special token, or half a character: wait for the next id
        piece = after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += piece
        return piece

    def finish(self) -> str:
        """What is left, so that the whole returned text equals the decode of all ids.
        One decode of the whole output (O(length), once per request)."""
        full = self._decode(self.ids)
        if full.startswith(self.text):
            rest = full[len(self.text):]
        else:  # a tokenizer whose windowed decode differs from the whole: keep what was sent
            log.warning("incremental detokenization diverged from the full decode; "
                        "the streamed text may differ from tokenizer.decode")
            rest = self._decode(self.ids[self._prefix:])[
                len(self._decode(self.ids[self._prefix:self._read])):]
        self._prefix = self._read = len(self.ids)
        self.text += rest
        return rest


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class TextStream:
    """One request's output text for the client: detokenized, cut at the first stop string.

    :meth:`push` gives the text that may be sent now. Once it reports ``stopped``
    the response is over: the caller sends the piece, finishes with ``"stop"``,
    and aborts the request in the engine. ``text`` is everything sent.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (),
                 skip_ids: Iterable[int] = ()) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, skip_ids)
        self.stops = tuple(s for s in stop if s)
        self._decoded = ""  # all text decoded so far
        self._sent = 0  # _decoded[:_sent] was returned by push
        self.stopped = False

    @property
    def text(self) -> str:
        return self._decoded[:self._sent]

    def push(self, new_ids: Iterable[int], finished: bool) -> tuple[str, bool]:
        """(text to send now, whether a stop string ended the output).

        ``finished``: the engine's last output for this request; everything left is
        returned (a stop string found in it still cuts it)."""
        if self.stopped:
            return "", True
        self._decoded += self.detok.push(new_ids)
        if finished:
            self._decoded += self.detok.finish()
        # A stop string begins at or after _sent: a tail that could begin one was held back.
        hits = [i for i in (self._decoded.find(s, self._sent) for s in self.stops) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
        elif finished:
            end = len(self._decoded)
        else:
            end = len(self._decoded) - _held_back(self._decoded[self._sent:], self.stops)
        piece, self._sent = self._decoded[self._sent:end], end
        return piece, self.stopped
