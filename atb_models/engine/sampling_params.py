import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

from atb_models.errors import UserError

MAX_LOGPROBS = 20  # most likely tokens a step may report (OpenAI's top_logprobs limit, vLLM's default)
LOGIT_BIAS_LIMIT = 100  # |bias| allowed (OpenAI's range: -100 bans a token, 100 all but forces it)
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 0 .. 2**64 - 1
# A temperature below this is greedy: dividing float32 logits by less would overflow them (vLLM's rule too).
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. temperature 0 (or below 1e-5) is greedy; every field is honoured. Values are
    checked when the object is made, so a bad one fails here, in one line naming its field, and never inside a
    running batch; the object is frozen, so it stays as checked (`dataclasses.replace` makes a checked copy)."""

    max_tokens: Optional[int] = None      # None: the engine's max_output_length
    temperature: float = 0.0
    top_k: int = 0                        # 0: no top-k cut
    top_p: float = 1.0
    min_p: float = 0.0                    # 0..1: drop tokens less likely than min_p times the most likely one
    repetition_penalty: float = 1.0
    # OpenAI's penalties, over the generated tokens only: each token's logit less presence_penalty once it has
    # appeared and frequency_penalty times its count; -2..2 (negative values encourage repeats).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    ignore_eos: bool = False
    # The answer's least length: until it holds min_tokens tokens, eos cannot be drawn and stop strings do not end
    # it (vLLM's rule); at most max_tokens.
    min_tokens: int = 0
    # Strings that end the answer where they first appear (finish_reason "stop", RequestOutput.stop_reason the
    # string); the text stops before them (after, with include_stop_str_in_output), the token ids keep every token
    # generated. A string or a sequence of strings; kept as a tuple.
    stop: tuple = ()
    # Token ids that end the answer when drawn (finish_reason "stop", RequestOutput.stop_reason the id), eos or not,
    # ignore_eos or not; held back before min_tokens like eos. Kept as a tuple; ids beyond the vocabulary are
    # refused when the request is added.
    stop_token_ids: tuple = ()
    # Whether the text keeps the stop string, or the stop token's text, that ended it (vLLM's field): False cuts it.
    include_stop_str_in_output: bool = False
    # Whether the text leaves out special tokens (<|im_end|>, <|vision_start|>, ...); their ids stay in token_ids.
    skip_special_tokens: bool = True
    # vLLM's allowed_token_ids: the only tokens the answer may draw (eos among them if it may end before
    # max_tokens); None for all. Kept as a sorted tuple; not with structured_output (two masks that may exclude
    # each other).
    allowed_token_ids: Optional[tuple] = None
    # vLLM's bad_words: words the answer must not contain. Each is tokenized alone and after a space (LLM's
    # _bad_word_tokens); the last token of such a sequence is ruled out where the answer's last tokens are the ones
    # before it.
    bad_words: tuple = ()
    # Log-probabilities: None asks for none; N reports each generated token's logprob and the step's N most likely
    # tokens with theirs (RequestOutput.logprobs; atb_models.engine.logprobs says which distribution).
    logprobs: Optional[int] = None
    # Prompt log-probabilities (vLLM's prompt_logprobs): None asks for none; N reports each prompt token's logprob
    # given the tokens before it, with the N most likely tokens at that position (RequestOutput.prompt_logprobs).
    # The prompt is then computed whole, not read from the prefix cache (a cached prefix has no logits).
    prompt_logprobs: Optional[int] = None
    # OpenAI's logit_bias: {token id: bias in -100..100}, added to the raw logits before any penalty or draw (greedy
    # too); kept as a sorted tuple of (id, bias) pairs. Ids beyond the vocabulary are refused when the request is
    # added (the engine knows the vocabulary, the parameters do not). The logprobs stay the model's own.
    logit_bias: tuple = ()
    # An engine.structured_output.StructuredOutput the answer must match (a JSON schema, a regex, a choice): tokens
    # that cannot continue a match are masked at each step, greedy too; the answer ends ("stop") once complete.
    structured_output: Optional[object] = None

    def __post_init__(self):
        def settle(name: str, value) -> None:  # the checked, normalised value (frozen: set through object)
            object.__setattr__(self, name, value)

        if self.max_tokens is not None:
            settle("max_tokens", _integer("max_tokens", self.max_tokens, "an integer >= 1 (or None)"))
            if self.max_tokens < 1:
                raise UserError(f"max_tokens must be at least 1, got {self.max_tokens}")
        settle("temperature", _number("temperature", self.temperature, "a finite number >= 0 (0 is greedy)"))
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}")
        settle("top_k", _integer("top_k", self.top_k, "an integer >= 0 (0 turns it off)"))
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        settle("top_p", _number("top_p", self.top_p, "a number in (0, 1]"))
        if not 0 < self.top_p <= 1:  # false for nan too
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        settle("repetition_penalty", _number("repetition_penalty", self.repetition_penalty, "a finite number > 0"))
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise UserError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            settle(name, _number(name, getattr(self, name), "a number in -2..2"))
            if not -2 <= getattr(self, name) <= 2:  # false for nan too
                raise UserError(f"{name} must be a number in -2..2, got {getattr(self, name)}")
        if self.seed is not None:
            settle("seed", _integer("seed", self.seed, "an integer in 0..2**64-1 (or None)"))
            if not 0 <= self.seed < SEED_LIMIT:
                raise UserError(f"seed must be in 0..2**64-1, got {self.seed}")
        settle("min_p", _number("min_p", self.min_p, "a number in 0..1"))
        if not 0 <= self.min_p <= 1:  # false for nan too
            raise UserError(f"min_p must be a number in 0..1 (0 turns it off), got {self.min_p}")
        settle("min_tokens", _integer("min_tokens", self.min_tokens, "an integer >= 0"))
        if self.min_tokens < 0:
            raise UserError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise UserError(f"min_tokens {self.min_tokens} is more than max_tokens {self.max_tokens}")
        if not isinstance(self.ignore_eos, bool):
            raise UserError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        settle("stop", _stop_strings(self.stop))
        settle("stop_token_ids", _token_ids("stop_token_ids", self.stop_token_ids))
        for name in ("include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.allowed_token_ids is not None:
            settle("allowed_token_ids", _token_ids("allowed_token_ids", self.allowed_token_ids))
            if not self.allowed_token_ids:
                raise UserError("allowed_token_ids must name at least one token id (or be None for all)")
        settle("bad_words", _words("bad_words", self.bad_words))
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                settle(name, _integer(name, value, f"an integer in 0..{MAX_LOGPROBS} (or None)"))
                if not 0 <= getattr(self, name) <= MAX_LOGPROBS:
                    raise UserError(f"{name} must be in 0..{MAX_LOGPROBS}, got {value}")
        settle("logit_bias", _logit_bias(self.logit_bias))
        if self.structured_output is not None:
            from atb_models.engine.structured_output import StructuredOutput

            if not isinstance(self.structured_output, StructuredOutput):
                raise UserError(f"structured_output must be a StructuredOutput, got {self.structured_output!r}")
            if self.allowed_token_ids is not None:
                raise UserError("allowed_token_ids cannot be combined with a structured output: the two masks may "
                                "leave no token to draw")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def penalised(self) -> bool:
        """Whether any penalty changes the logits before the draw."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def shapes_logits(self) -> bool:
        """Whether anything changes the logits before the draw (a greedy draw is then not the raw argmax)."""
        return (self.penalised or bool(self.logit_bias) or self.structured_output is not None
                or self.min_tokens > 0 or self.allowed_token_ids is not None or bool(self.bad_words))

    def token_ids_named(self) -> dict:
        """The token ids each field names (logit_bias, stop_token_ids, allowed_token_ids), for the engine's check
        against its vocabulary."""
        return {"logit_bias": [token for token, _ in self.logit_bias], "stop_token_ids": list(self.stop_token_ids),
                "allowed_token_ids": list(self.allowed_token_ids or ())}


def _integer(name: str, value, allowed: str) -> int:
    """value as an int; a bool or a float (even 3.0) is refused: it is most likely a mix-up of fields."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UserError(f"{name} must be {allowed}, got {_shown(value)} ({type(value).__name__})")
    return int(value)


def _stop_strings(value) -> tuple:
    """stop as a tuple of non-empty strings; a lone string is one stop string."""
    strings = (value,) if isinstance(value, str) else value
    if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) and s for s in strings):
        raise UserError(f"stop must be a non-empty string or a list of them, got {_shown(value)}")
    return tuple(strings)


def _token_ids(name: str, value) -> tuple:
    """A list of token ids as a sorted tuple without repeats."""
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise UserError(f"{name} must be a list of token ids (integers >= 0), got {_shown(value)}")
    if all(type(token) is int for token in value):  # (the common case, without a call per id: lists may be long)
        ids = set(value)
    else:
        ids = {_integer(f"{name}'s token id", token, "an integer >= 0") for token in value}
    if ids and min(ids) < 0:
        raise UserError(f"{name} must hold integers >= 0, got {min(ids)}")
    return tuple(sorted(ids))


def _words(name: str, value) -> tuple:
    """A list of non-blank strings as a tuple (a lone string is one)."""
    words = (value,) if isinstance(value, str) else value
    if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) and w.strip() for w in words):
        raise UserError(f"{name} must be a list of non-blank strings, got {_shown(value)}")
    for word in words:
        try:  # (the engine's thread tokenizes them, and the tokenizer takes only text UTF-8 can hold)
            word.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"{name}: {_shown(word)} holds a lone surrogate, which is not a character") from None
    return tuple(words)


def _shown(value, most: int = 200) -> str:
    """A value as an error message quotes it: a long one cut (a request may send megabytes)."""
    text = repr(value)
    return text if len(text) <= most else f"{text[:most]}... ({len(text)} characters)"


def _logit_bias(value) -> tuple:
    """logit_bias as sorted (token id, bias) pairs from a mapping (or such pairs); a bias of 0 is dropped."""
    allowed = f"a mapping of token ids (integers >= 0) to biases in -{LOGIT_BIAS_LIMIT}..{LOGIT_BIAS_LIMIT}"
    if value is None:
        return ()
    try:
        pairs = list(value.items() if hasattr(value, "items") else value)
        pairs = [(token, bias) for token, bias in pairs]
    except (TypeError, ValueError):
        raise UserError(f"logit_bias must be {allowed}, got {_shown(value)}") from None
    checked = {}
    for token, bias in pairs:
        token = _integer("logit_bias's token id", token, "an integer >= 0")
        bias = _number(f"logit_bias[{token}]", bias, f"a number in -{LOGIT_BIAS_LIMIT}..{LOGIT_BIAS_LIMIT}")
        if token < 0:
            raise UserError(f"logit_bias's token ids must be integers >= 0, got {token}")
        if not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:  # false for nan too
            raise UserError(f"logit_bias[{token}] must be a number in -{LOGIT_BIAS_LIMIT}..{LOGIT_BIAS_LIMIT}, "
                            f"got {bias}")
        if token in checked:
            raise UserError(f"logit_bias names token id {token} twice")
        checked[token] = bias
    return tuple(sorted((token, bias) for token, bias in checked.items() if bias))


def _number(name: str, value, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f"{name} must be {allowed}, got {_shown(value)} ({type(value).__name__})")
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range
        raise UserError(f"{name} must be {allowed}, got a number too large for a float") from None


MAX_BEAM_WIDTH = 64
EARLY_STOPPING = (False, True, "never")


@dataclass(frozen=True)
class BeamSearchParams:
    """How one prompt's beams are searched: `beam_width` beams (and answers back); `max_tokens` (None: the
    engine's max_output_length); `length_penalty`, the power of its length a hypothesis's sum is divided by (above
    0 favours longer answers); `early_stopping` (False, True or "never": transformers' meanings); `ignore_eos`: eos
    ends nothing, every answer runs to max_tokens. Checked when made, as SamplingParams is."""

    beam_width: int = 4
    max_tokens: Optional[int] = None
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False
    ignore_eos: bool = False

    def __post_init__(self):
        for name, low, high in (("beam_width", 1, MAX_BEAM_WIDTH), ("max_tokens", 1, None)):
            value = getattr(self, name)
            if value is None and name == "max_tokens":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (
                    high is not None and value > high):
                raise UserError(f"{name} must be an integer in {low}..{high or 'max_output_length'}, got {value!r}")
        if (isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, numbers.Real)
                or not math.isfinite(self.length_penalty)):
            raise UserError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if not any(self.early_stopping is choice or self.early_stopping == choice == "never"
                   for choice in EARLY_STOPPING):
            raise UserError(f"early_stopping must be False, True or \"never\", got {self.early_stopping!r}")
        if not isinstance(self.ignore_eos, bool):
            raise UserError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
