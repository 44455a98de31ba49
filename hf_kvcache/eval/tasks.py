"""Synthetic long-context tasks: needles hidden in a book, and a word-frequency task, in the spirit of RULER.

The protocol follows RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?", https://arxiv.org/abs/2404.06654): facts ("needles") are inserted at random depths of
natural text, and the question comes after the text. The templates, word lists and sizes here are this
project's own. Tasks (`TASKS`):

- `passkey`: one 5-digit pass key;
- `word`: one "special magic word" for a key;
- `multikey`: several numbers under different keys, one key asked;
- `multivalue`: several numbers under the same key, all asked;
- `variable_tracking`: chains of assignments `VAR ABCDE = 31415`, `VAR FGHIJ = VAR ABCDE`, ...; every
  variable holding the asked value must be named;
- `common_words`: a numbered list of words in which `COMMON_TOP_K` words occur `COMMON_COUNT` times and the
  others at most `RARE_COUNT` times; the most frequent words must be named.

The haystack is Crime and Punishment (bundled, public domain; `bundled_text("pg19")`) with its hard line
wraps undone. Sample `index` of `seed` reads the book from the first word at or after character
`base(seed) + index * span` (wrapping around the end), `span` being `SPAN_MARGIN` times the characters that
`context_tokens` tokens take at the start of the book, so consecutive samples read disjoint passages (only
a passage denser in tokens than that margin reads on into the next one). `common_words` takes the words of
its list from its passage. Everything random is drawn from `(task, seed, index)`: a sample can be rebuilt
alone, which lets samples be sharded across processes.

A prompt is `Sample.text`: instructions, haystack with needles, question, then `answer_prefix` (the words
that start the answer). Its length is measured with the given tokenizer (without special tokens) and is at
most `context_tokens` and short of it by less than one haystack word. A chat template, when the evaluation
applies one, adds its own few dozen tokens on top.
"""

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from itertools import pairwise

from transformers import PreTrainedTokenizerBase

from hf_kvcache.eval.data import bundled_text
from hf_kvcache.validation import check_choice, check_int

MIN_HAYSTACK_TOKENS = 64  # below this the needles are not "hidden" in anything
SPAN_MARGIN = 1.25  # passage characters read per sample, relative to the characters the tokens need
COMMON_TOP_K = 3
COMMON_COUNT = 12  # occurrences of each frequent word
RARE_COUNT = 3  # at most this many occurrences of every other word
CHAINS, CHAIN_LENGTH = 2, 4  # variable tracking: chains, and variables per chain
KEYED_NEEDLES = 4  # multikey / multivalue: needles per prompt

# Keys are "adjective-noun" pairs that do not occur in the book; values are nouns foreign to it.
ADJECTIVES = (
    "amber", "brisk", "cobalt", "dusty", "eager", "fuzzy", "gentle", "hollow", "icy", "jolly", "lucky", "mellow",
    "nimble", "olive", "plucky", "quiet", "rustic", "sandy", "tidy", "velvet", "witty", "zesty", "breezy", "crisp",
)  # fmt: skip
KEY_NOUNS = (
    "falcon", "otter", "harbor", "meadow", "lantern", "canyon", "beacon", "glacier", "orchard", "compass", "pebble",
    "walrus", "tundra", "parrot", "voyage", "summit", "badger", "marble", "comet", "island", "thistle", "ferret",
)  # fmt: skip
VALUE_WORDS = (
    "kangaroo", "saxophone", "volcano", "pineapple", "telescope", "avocado", "penguin", "submarine", "cactus",
    "trombone", "giraffe", "hammock", "flamingo", "igloo", "koala", "mango", "narwhal", "origami", "pretzel",
    "raccoon", "sushi", "tornado", "ukulele", "waffle", "yogurt", "zeppelin", "banjo", "cricket", "dolphin",
    "espresso", "gondola", "hedgehog", "jigsaw", "kayak", "llama", "mosaic", "nectarine", "octopus", "panda",
    "robot", "scooter", "tulip", "unicorn", "vulture", "walnut", "yacht", "zebra", "balloon", "cheetah",
)  # fmt: skip
VARIABLE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]_]*\s+$")


@dataclass(frozen=True)
class Needle:
    """One inserted fact: its text, where it starts in `Sample.text` (characters and tokens), and its depth
    (token offset / prompt tokens, 0 = start, 1 = end)."""

    text: str
    char_offset: int
    token_offset: int
    depth: float


@dataclass(frozen=True)
class Sample:
    """One prompt: `text` = `prompt` + " " + `answer_prefix`; `answers` are the strings the answer must hold.

    `prompt` = `context` + `question`: the instructions and haystack (ending with the blank line before the
    question), then the question itself, so that a cache can take the context before the question is known.
    `context_tokens`: tokens of `text` with the generating tokenizer (no special tokens). `passage`: the
    [start, end) characters of `book_text()` the sample used (end passes the book's length when the passage
    wraps around to its start). `needles` is empty for
    `common_words`, whose frequent words are spread over the whole list.
    """

    task: str
    index: int
    seed: int
    prompt: str
    answer_prefix: str
    answers: tuple[str, ...]
    needles: tuple[Needle, ...]
    context_tokens: int
    passage: tuple[int, int]
    question: str = ""

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer_prefix}"

    @property
    def context(self) -> str:
        """The prompt before its question (all of it when `question` is empty)."""
        return self.prompt[: len(self.prompt) - len(self.question)]


@dataclass(frozen=True)
class TaskInfo:
    """A registered task: its generator `(tokenizer, context_tokens, seed, index) -> Sample`, a one-line
    description, and the new tokens an answer needs."""

    name: str
    generate: Callable[[PreTrainedTokenizerBase, int, int, int], Sample]
    description: str
    max_new_tokens: int


# --- the haystack -----------------------------------------------------------------------------------------
@cache
def book_text() -> str:
    """The bundled Crime and Punishment, one paragraph per line (hard line wraps undone)."""
    paragraphs = (" ".join(part.split()) for part in re.split(r"\n\s*\n", bundled_text("pg19")))
    return "\n".join(part for part in paragraphs if part)


def count_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """Tokens of `text` without special tokens (a BOS would count once per prompt, not per piece)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _span(tokenizer: PreTrainedTokenizerBase, context_tokens: int) -> int:
    """Characters of book a sample reads: enough for `context_tokens`, with a margin for denser passages."""
    sample = book_text()[:20_000]
    chars_per_token = len(sample) / count_tokens(tokenizer, sample)
    span = math.ceil(context_tokens * chars_per_token * SPAN_MARGIN) + 200
    if span > len(book_text()) // 2:
        limit = int((len(book_text()) // 2 - 200) / chars_per_token / SPAN_MARGIN)
        raise ValueError(
            f"context_tokens={context_tokens} is longer than the bundled book allows with this tokenizer; "
            f"accepted: context_tokens <= {limit}"
        )
    return span


def _passage_start(seed: int, index: int, span: int) -> int:
    """Start of sample `index`'s passage: the first word start at or after base(seed) + index * span (mod the
    book's length). Whole paragraphs would move a start by up to a long paragraph, into the next passage."""
    book = book_text()
    target = (random.Random(f"passage/{seed}").randrange(len(book)) + index * span) % len(book)
    space = re.compile(r"\s").search(book, target)
    return space.end() if space else 0


def _read(start: int, length: int) -> str:
    """`length` characters of the book from `start`, wrapping around its end, cut back to whole words."""
    book = book_text()
    text = (book[start:] + "\n" + book)[:length]
    return text[: text.rfind(" ")] if len(text) == length and " " in text else text


def _mentions(text: str, word: str) -> bool:
    """Whether `word` occurs in `text` as a whole word or number (case-insensitive)."""
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", text, re.IGNORECASE) is not None


def _fit(build: Callable[[int], str], tokenizer: PreTrainedTokenizerBase, upper: int, target: int) -> int:
    """The largest n in [0, upper] with count_tokens(build(n)) <= target, by binary search. The count grows
    with n but for a token or two at the seams; whatever n it returns, its prompt fits."""
    low, high = 0, upper + 1  # build(low) fits; build(high) does not, or high is past upper
    while high - low > 1:
        middle = (low + high) // 2
        if count_tokens(tokenizer, build(middle)) <= target:
            low = middle
        else:
            high = middle
    return low


def _refuse_short(task: str, context_tokens: int, fixed: int, unit: str) -> None:
    if fixed + MIN_HAYSTACK_TOKENS > context_tokens:
        raise ValueError(
            f"context_tokens={context_tokens} is too short for task {task!r}: its instructions, question and "
            f"{unit} take {fixed} tokens with this tokenizer; accepted: context_tokens >= "
            f"{fixed + MIN_HAYSTACK_TOKENS}"
        )


# --- needle tasks -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Needles:
    """What a needle task draws: the needle texts in insertion order, the question and the answers."""

    intro: str
    needles: tuple[str, ...]
    question: str
    answer_prefix: str
    answers: tuple[str, ...]


def _needle_sample(
    task: str,
    draw: Callable[[random.Random, str], _Needles],
    tokenizer: PreTrainedTokenizerBase,
    context_tokens: int,
    seed: int,
    index: int,
) -> Sample:
    """A sample of a needle task: book text around `draw`'s needles, trimmed to `context_tokens` tokens.

    The needles go in their drawn order at sorted random depths, each at the sentence boundary nearest to
    its depth, so that order-dependent needles (assignment chains) read in order.
    """
    rng = random.Random(f"{task}/{seed}/{index}")
    span = _span(tokenizer, context_tokens)
    start = _passage_start(seed, index, span)
    passage = _read(start, span)
    while count_tokens(tokenizer, passage) <= context_tokens:
        passage = _read(start, len(passage) * 2)  # denser in tokens than the margin allows for: read on
    drawn = draw(rng, passage)  # after the passage is final: the draw avoids whatever the haystack holds
    depths = sorted(rng.random() for _ in drawn.needles)
    units = re.findall(r"\S+\s*", passage)
    boundaries = [0] + [j + 1 for j, unit in enumerate(units) if _SENTENCE_END.search(unit)]

    def compose(n: int) -> tuple[str, list[int]]:
        """The text with the first n units of haystack, and the character offsets of the needles in it."""
        usable = [b for b in boundaries if b <= n] + [n]
        points = [min(usable, key=lambda b, d=depth: abs(b - d * n)) for depth in depths]
        text, offsets, previous = drawn.intro, [], 0
        for point, needle in zip(points, drawn.needles):
            text += "".join(units[previous:point])
            if not text[-1].isspace():
                text += " "
            offsets.append(len(text))
            text += needle + " "
            previous = point
        text = text + "".join(units[previous:n])
        return f"{text.rstrip()}\n\n{drawn.question} {drawn.answer_prefix}", offsets

    _refuse_short(task, context_tokens, count_tokens(tokenizer, compose(0)[0]), "needles")
    n = _fit(lambda n: compose(n)[0], tokenizer, len(units), context_tokens)
    text, offsets = compose(n)
    total = count_tokens(tokenizer, text)
    needles = []
    for needle, offset in zip(drawn.needles, offsets):
        before = count_tokens(tokenizer, text[:offset])
        needles.append(Needle(needle, offset, before, before / total))
    used = len("".join(units[:n]))
    prompt = text[: -len(drawn.answer_prefix) - 1]
    return Sample(
        task,
        index,
        seed,
        prompt,
        drawn.answer_prefix,
        drawn.answers,
        tuple(needles),
        total,
        (start, start + used),
        drawn.question,
    )


def _number(rng: random.Random, passage: str, taken: Sequence[str], digits: int = 5) -> str:
    """A random `digits`-digit number that the passage does not contain and that differs from `taken`."""
    while True:
        value = str(rng.randrange(10 ** (digits - 1), 10**digits))
        if value not in taken and not _mentions(passage, value):
            return value


def _keys(rng: random.Random, passage: str, count: int) -> list[str]:
    """`count` different "adjective-noun" keys absent from the passage, with different adjectives and nouns."""
    adjectives = [word for word in ADJECTIVES if not _mentions(passage, word)]
    nouns = [word for word in KEY_NOUNS if not _mentions(passage, word)]
    return [f"{a}-{n}" for a, n in zip(rng.sample(adjectives, count), rng.sample(nouns, count))]


INTRO = "Some facts are hidden in the text below. Read it and remember them: a question about them follows.\n\n"


def _draw_passkey(rng: random.Random, passage: str) -> _Needles:
    key = _number(rng, passage, ())
    return _Needles(
        INTRO,
        (f"The pass key is {key}. Remember it.",),
        "What is the 5-digit pass key hidden in the text?",
        "The pass key is",
        (key,),
    )


def _draw_word(rng: random.Random, passage: str) -> _Needles:
    (key,) = _keys(rng, passage, 1)
    word = rng.choice([word for word in VALUE_WORDS if not _mentions(passage, word)])
    return _Needles(
        INTRO,
        (f"The special magic word for {key} is {word}.",),
        f"What is the special magic word for {key} hidden in the text?",
        f"The special magic word for {key} is",
        (word,),
    )


def _draw_multikey(rng: random.Random, passage: str) -> _Needles:
    keys = _keys(rng, passage, KEYED_NEEDLES)
    values: list[str] = []
    for _ in keys:
        values.append(_number(rng, passage, values))
    asked = rng.randrange(len(keys))
    return _Needles(
        INTRO,
        tuple(f"The special magic number for {key} is {value}." for key, value in zip(keys, values)),
        f"What is the special magic number for {keys[asked]} hidden in the text?",
        f"The special magic number for {keys[asked]} is",
        (values[asked],),
    )


def _draw_multivalue(rng: random.Random, passage: str) -> _Needles:
    (key,) = _keys(rng, passage, 1)
    values: list[str] = []
    for _ in range(KEYED_NEEDLES):
        values.append(_number(rng, passage, values))
    return _Needles(
        INTRO,
        tuple(f"The special magic number for {key} is {value}." for value in values),
        f"What are all the special magic numbers for {key} hidden in the text?",
        f"The special magic numbers for {key} are:",
        tuple(values),
    )


def _draw_variable_tracking(rng: random.Random, passage: str) -> _Needles:
    names: list[str] = []
    while len(names) < CHAINS * CHAIN_LENGTH:
        name = "".join(rng.choice(VARIABLE_LETTERS) for _ in range(5))
        if name not in names and not _mentions(passage, name):  # not even a word of the book in capitals
            names.append(name)
    values: list[str] = []
    chains = []
    for chain in range(CHAINS):
        chain_names = names[chain * CHAIN_LENGTH : (chain + 1) * CHAIN_LENGTH]
        values.append(_number(rng, passage, values))
        steps = [f"VAR {chain_names[0]} = {values[-1]}."]
        steps += [f"VAR {name} = VAR {previous}." for previous, name in pairwise(chain_names)]
        chains.append(steps)
    # Interleave the chains at random while keeping each chain's own order.
    order = [chain for chain, steps in enumerate(chains) for _ in steps]
    rng.shuffle(order)
    needles = tuple(chains[chain].pop(0) for chain in order)
    return _Needles(
        "Chains of variable assignments are hidden in the text below. Follow them.\n\n",
        needles,
        f"Which variables are assigned the value {values[0]}, directly or through other variables?",
        f"The variables that hold the value {values[0]} are:",
        tuple(names[:CHAIN_LENGTH]),
    )


# --- common words -----------------------------------------------------------------------------------------
COMMON_INTRO = "Below is a numbered list of words. Some of them occur much more often than the others.\n\n"


def _common_words_sample(tokenizer: PreTrainedTokenizerBase, context_tokens: int, seed: int, index: int) -> Sample:
    """A numbered list of words from the sample's passage: `COMMON_TOP_K` words `COMMON_COUNT` times each,
    then other words up to `RARE_COUNT` times each, as many as `context_tokens` allows, shuffled."""
    task = "common_words"
    rng = random.Random(f"{task}/{seed}/{index}")
    question = f"What are the {COMMON_TOP_K} most frequent words in the list above?"
    answer_prefix = f"The {COMMON_TOP_K} most frequent words in the list are:"
    template_words = set(re.findall(r"[a-z]+", (COMMON_INTRO + question + answer_prefix).lower()))
    span = _span(tokenizer, context_tokens)
    start = _passage_start(seed, index, span)
    # Entries take at least two tokens each: this many distinct words always suffice.
    needed = COMMON_TOP_K + context_tokens // (2 * RARE_COUNT) + 1
    length = span
    while True:
        passage = _read(start, length)
        ends: dict[str, int] = {}  # each word, with where its first occurrence ends, in passage order
        for match in re.finditer(r"\b[a-z]{4,}\b", passage):
            if match.group() not in template_words:
                ends.setdefault(match.group(), match.end())
        if len(ends) >= needed or length >= len(book_text()):
            break
        length *= 2
    vocabulary = list(ends)
    common = rng.sample(vocabulary[: 4 * COMMON_TOP_K], COMMON_TOP_K)
    rare = [word for word in vocabulary if word not in common]  # in passage order: the passage used is a prefix
    rare_stream = [word for word in rare for _ in range(RARE_COUNT)]

    def compose(m: int) -> str:
        words = common * COMMON_COUNT + rare_stream[:m]
        random.Random(f"{task}/{seed}/{index}/{m}").shuffle(words)
        listing = "\n".join(f"{number}. {word}" for number, word in enumerate(words, start=1))
        return f"{COMMON_INTRO}{listing}\n\n{question} {answer_prefix}"

    fixed = count_tokens(tokenizer, compose(0))
    _refuse_short(task, context_tokens, fixed, f"{COMMON_TOP_K * COMMON_COUNT} frequent words")
    if len(vocabulary) < needed and (filled := count_tokens(tokenizer, compose(len(rare_stream)))) < context_tokens:
        raise ValueError(
            f"context_tokens={context_tokens} is too long for task {task!r}: the {len(vocabulary)} different words "
            f"of the book fill {filled} tokens with this tokenizer; accepted: context_tokens <= {filled}"
        )
    m = _fit(compose, tokenizer, len(rare_stream), context_tokens)
    text = compose(m)
    prompt = text[: -len(answer_prefix) - 1]
    used = max(ends[word] for word in common + rare[: math.ceil(m / RARE_COUNT)])
    return Sample(
        task,
        index,
        seed,
        prompt,
        answer_prefix,
        tuple(common),
        (),
        count_tokens(tokenizer, text),
        (start, start + used),
        question,
    )


# --- registry and scoring ---------------------------------------------------------------------------------
def _needle_task(name: str, draw: Callable[[random.Random, str], _Needles]) -> Callable[..., Sample]:
    def generate(tokenizer: PreTrainedTokenizerBase, context_tokens: int, seed: int, index: int) -> Sample:
        return _needle_sample(name, draw, tokenizer, context_tokens, seed, index)

    return generate


TASKS: dict[str, TaskInfo] = {
    info.name: info
    for info in (
        TaskInfo("passkey", _needle_task("passkey", _draw_passkey), "one 5-digit pass key at a random depth", 12),
        TaskInfo("word", _needle_task("word", _draw_word), "one special magic word for a key", 12),
        TaskInfo(
            "multikey",
            _needle_task("multikey", _draw_multikey),
            f"{KEYED_NEEDLES} numbers under different keys, one key asked",
            12,
        ),
        TaskInfo(
            "multivalue",
            _needle_task("multivalue", _draw_multivalue),
            f"{KEYED_NEEDLES} numbers under one key, all asked",
            48,
        ),
        TaskInfo(
            "variable_tracking",
            _needle_task("variable_tracking", _draw_variable_tracking),
            f"{CHAINS} chains of {CHAIN_LENGTH} variable assignments; name every variable holding a value",
            48,
        ),
        TaskInfo(
            "common_words",
            _common_words_sample,
            f"name the {COMMON_TOP_K} most frequent words of a long numbered list",
            32,
        ),
    )
}


def generate_sample(
    task: str, tokenizer: PreTrainedTokenizerBase, context_tokens: int, seed: int = 0, index: int = 0
) -> Sample:
    """Sample `index` of `task` for `seed`: the same whatever other samples are generated.

    Raises:
        ValueError: an unknown task, a context too short for the task's needles or too long for the book,
            a negative seed or index.
    """
    check_choice("task", task, tuple(TASKS))
    check_int("context_tokens", context_tokens, minimum=1)
    check_int("seed", seed, minimum=0)
    check_int("index", index, minimum=0)
    return TASKS[task].generate(tokenizer, context_tokens, seed, index)


def generate_samples(
    task: str, tokenizer: PreTrainedTokenizerBase, context_tokens: int, samples: int, seed: int = 0
) -> list[Sample]:
    """Samples 0 .. `samples` - 1 of `task`, each about `context_tokens` tokens long (see the module doc).

    Raises:
        ValueError: as `generate_sample`, or `samples` < 1.
    """
    check_int("samples", samples, minimum=1)
    return [generate_sample(task, tokenizer, context_tokens, seed, index) for index in range(samples)]


def score(sample: Sample, generated_text: str) -> float:
    """The fraction of `sample.answers` found in `generated_text` as whole words or numbers, ignoring case
    (RULER's string-match metric; for single-answer tasks 1.0 or 0.0)."""
    return sum(_mentions(generated_text, answer) for answer in sample.answers) / len(sample.answers)
