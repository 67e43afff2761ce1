"""Structured output: an answer held to a JSON schema, a regular expression, a list of choices or a grammar
(OpenAI's `response_format`, vLLM's guided decoding) by masking, at each step, the tokens that cannot continue a match.

llguidance (guidance-ai's grammar engine, one of vLLM's structured-output backends) compiles the constraint for the
checkpoint's tokenizer and tracks each answer's match; it is imported only when a request asks for a constraint.
Every rank keeps each constrained sequence's matcher and feeds it the tokens of every step, so that all agree when
the constraint is complete (the sequence then finishes, "stop"); only rank 0, which samples, asks it for masks.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from copy import copy
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from atb_models.errors import UserError

MAX_SPEC_CHARS = 100_000  # a schema, regex, grammar or the choices, as text: compiled on the engine's thread
MAX_CHOICE_STRINGS = 1000  # a choice's strings (each an alternative of the grammar compiled)
KEPT_CONSTRAINTS = 16  # compiled constraints kept for the requests that follow (Matchers)
# The whitespace a JSON answer may hold between two of its tokens: enough for pretty-printing (a newline and deep
# indentation), bounded so that a model cannot fill the answer with whitespace and never finish the object.
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{1,64}"
COMPACT_JSON_WHITESPACE = r"\x20"  # StructuredOutput.compact's: at most one space between two tokens
KINDS = ("json", "regex", "choice", "grammar")  # a StructuredOutput's constraints: it names one


@dataclass(frozen=True)
class StructuredOutput:
    """What an answer must match; exactly one of: `json`, a JSON schema (a dict, or its text) or True for any JSON
    object; `regex`, a regular expression (Rust's regex syntax) the whole answer matches; `choice`, strings the
    answer is one of; `grammar`, a context-free grammar the answer is a sentence of, in llguidance's Lark syntax
    or llama.cpp's GBNF (vLLM's guided_grammar: `root ::= ...`, converted to Lark). Checked when made; the schema kept as JSON text (the object stays hashable).
    `compact`: a JSON answer holds at most one space between two tokens, for answers a program reads (function
    calls): a small model left free pads them with whitespace until max_tokens."""

    json: object = None
    regex: Optional[str] = None
    choice: Optional[tuple] = None
    grammar: Optional[str] = None
    compact: bool = False

    def __post_init__(self):
        given = [name for name in KINDS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise UserError(f"a structured output names exactly one of {', '.join(KINDS)} (got {given or 'none'})")
        if self.json is not None and self.json is not True:
            object.__setattr__(self, "json", _schema_text(self.json))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise UserError(f"{name} must be a non-empty string, got {value!r}")
        if self.choice is not None:
            if (isinstance(self.choice, str) or not isinstance(self.choice, (list, tuple)) or not self.choice
                    or len(self.choice) > MAX_CHOICE_STRINGS
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise UserError(f"choice must be a list of 1..{MAX_CHOICE_STRINGS} non-empty strings, "
                                f"got {self.choice!r}")
            object.__setattr__(self, "choice", tuple(self.choice))
        if len(self.describe()) > MAX_SPEC_CHARS:
            raise UserError(f"the structured output's {given[0]} is longer than {MAX_SPEC_CHARS} characters")

    def describe(self) -> str:
        """The constraint as text (for messages and the size limit)."""
        if self.json is True:
            return "any JSON object"
        return self.json or self.regex or self.grammar or json.dumps(list(self.choice))

    def compiled_grammar(self) -> str:
        """llguidance's grammar for the constraint."""
        from llguidance import LLMatcher

        if self.json is not None:
            schema = '{"type": "object"}' if self.json is True else self.json
            whitespace = COMPACT_JSON_WHITESPACE if self.compact else JSON_WHITESPACE
            return LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_pattern": whitespace})
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.grammar is not None:
            from llguidance import grammar_from

            return grammar_from("grammar", self.grammar)  # (Lark as it is, GBNF converted; a ValueError where not)
        # (a JSON string literal is a Lark string literal: quotes and backslashes escaped alike)
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))


def _schema_text(schema) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise UserError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise UserError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        # (keys in the order given: a JSON answer's properties come in the schema's order, as a function's
        # arguments are declared)
        return json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UserError(f"the JSON schema cannot be written as JSON: {e}") from None


class Matchers:
    """The engine's side of structured output: the tokenizer in llguidance's form, built at the first constrained
    request, and a SequenceMatcher for each such request. The latest constraints' compiled matchers are kept, each
    sequence taking a copy: a request's n choices (and its prompts) share one constraint, and a compile of a large
    schema is long work on the engine's thread, while every other request waits. The server
    compiles a request's constraint in its preprocessing thread first (`matcher`: the engine's own call then finds it
    here) and builds the tokenizer's form before it serves (`prepare`); a lock keeps the two threads' uses apart."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids):
        self._tokenizer, self._vocab_size, self._eos = tokenizer, vocab_size, list(eos_token_ids)
        self._ll_tokenizer = None
        self._compiled: OrderedDict = OrderedDict()  # StructuredOutput -> an LLMatcher fed nothing, latest last
        self._lock = threading.Lock()  # the cache and the tokenizer's form (a compile runs outside it)

    def matcher(self, constraint: StructuredOutput) -> "SequenceMatcher":
        """A new matcher for `constraint`; a constraint llguidance cannot compile is a UserError naming why."""
        with self._lock:
            compiled = self._compiled.get(constraint)
            if compiled is not None:
                self._compiled.move_to_end(constraint)
        if compiled is None:
            compiled = self._compile(constraint)
            with self._lock:
                self._compiled[constraint] = compiled
                if len(self._compiled) > KEPT_CONSTRAINTS:
                    self._compiled.popitem(last=False)
        return SequenceMatcher(compiled.deep_copy(), self._eos)

    def prepare(self) -> None:
        """The tokenizer in llguidance's form, made now (llguidance reads every token of the vocabulary: long for
        Qwen's 151k) rather than at the first constrained request; nothing where llguidance is missing."""
        try:
            self._ll_tokenizer_made()
        except UserError:
            pass

    def _ll_tokenizer_made(self):
        try:
            from llguidance import LLTokenizer
        except ImportError:
            raise UserError("structured output needs the llguidance package: pip install llguidance") from None
        with self._lock:
            if self._ll_tokenizer is not None:
                return self._ll_tokenizer
            # The tokenizer as llguidance.hf.from_tokenizer hands it over, less its normalizer: llguidance tokenizes
            # text a constraint forces (a choice) to find its tokens, and Qwen's NFC turned "e\u0301" into the
            # tokens of "\u00e9", whose bytes the constraint then refused (the answer ended on half a character).
            # The model draws bytes, never normalized text.
            backend = copy(self._tokenizer.backend_tokenizer)
            backend.no_padding()
            backend.no_truncation()
            backend.normalizer = None
            self._ll_tokenizer = LLTokenizer(backend.to_str(), n_vocab=self._vocab_size, eos_token=self._eos)
            return self._ll_tokenizer

    def _compile(self, constraint: StructuredOutput):
        tokenizer = self._ll_tokenizer_made()
        from llguidance import LLMatcher

        try:
            matcher = LLMatcher(tokenizer, constraint.compiled_grammar(), log_level=0)
        except ValueError as e:  # (what llguidance raises for a schema it cannot read: one nested > 127 deep)
            raise UserError(f"the structured output cannot be used: {e}") from None
        if matcher.is_error():
            raise UserError(f"the structured output cannot be used: {matcher.get_error()}")
        # A constraint no text can match (a regex of an empty class, a schema that only refers to itself) compiles,
        # and its first mask breaks the matcher: the answer would come back empty, as if complete.
        probe = matcher.deep_copy()
        probe.compute_bitmask()
        if probe.is_error():
            raise UserError(f"the structured output admits no answer: no text matches {constraint.describe()[:200]}")
        return matcher


class SequenceMatcher:
    """One constrained sequence's match so far."""

    def __init__(self, matcher, eos_token_ids: list):
        self._matcher, self._eos = matcher, eos_token_ids

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """A bool mask [vocab_size] of the tokens that can continue the match; where none can (a matcher in error),
        the end-of-sequence tokens, so that the answer ends rather than going on unconstrained."""
        bits = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.zeros(vocab_size, dtype=torch.bool)
        covered = min(vocab_size, len(bits))  # (the bitmask covers the tokenizer's vocabulary, rounded up to 32)
        allowed[:covered] = torch.from_numpy(bits[:covered].astype(bool))
        if not allowed.any():
            allowed[self._eos] = True
        return allowed

    def advance(self, token: int) -> bool:
        """Feeds the matcher the token drawn; whether the constraint is now complete (or broken: the token was not
        one it allowed), which ends the sequence."""
        self._matcher.consume_token(token)
        return self._matcher.is_stopped() or self._matcher.is_error()
