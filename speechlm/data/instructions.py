"""Text instruction tasks on the embedded corpus, in the BLSP prompt format.

One catalogue (`TASKS`) serves two sides:

- the embedded zoo's text LLM learns these tasks on text (`task: text_lm`);
- the speech side (BLSP) reuses the same wording with speech in place of the
  input text, and scores the same way, so a zero-shot transfer table compares
  like with like.

The prompt format is BLSP's (github.com/cwang621/blsp, stage-1 continuation
writing and `generate.py`):

    ###[Human]:{instruction} {input}\\n\\n\\n###[Assistant]:{response}</s>

Token ids follow BLSP's code as well: the prompt is tokenized as one string
(with BOS), the response separately without special tokens (so its first word
carries SentencePiece's leading "▁") and EOS is appended; only the response
and EOS are learned. `prompt_parts` splits the prompt ids into the ids before
the input, the input's own ids and the ids after it, so a speech model can put
speech embeddings exactly where the LLM read the input text.

Each task has a name, instruction wordings (the first is canonical: the one
evaluated and the one the speech side should use; the others are trained as
paraphrases), a builder from a verse and the verses that follow it in its
chapter, and a scorer. Plain text (`PLAIN_TEXT`: consecutive verses, no
template, loss on every token) teaches the languages themselves.

Held out: every verse of the books the embedded speech corpus uses for dev and
test (`heldout_books()`, read from `EMBEDDED`), plus any verse elsewhere whose
text equals one of them, never enters training; `eval_contexts(split)` gives
the very verses the speech dev/test sets speak.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from .text_corpus import Verse, load_verses, normalized_key

__all__ = [
    "ASSISTANT", "CHAT_TEMPLATE", "CONTINUE_INSTRUCTION", "Encoded", "Example", "HUMAN",
    "PLAIN_TEXT", "PromptParts", "SEPARATOR", "TASKS", "Task", "VerseContext",
    "build_examples", "build_task_examples", "chapter_contexts", "encode_example",
    "encode_examples", "eval_contexts", "eval_examples", "get_task", "heldout_books",
    "last_word", "mentions_god", "plain_text_examples", "prompt_parts", "render_example",
    "render_prompt", "scrambled", "split_training_verses", "with_wording",
]

HUMAN = "###[Human]:"
SEPARATOR = "\n\n\n"
ASSISTANT = "###[Assistant]:"
CONTINUE_INSTRUCTION = ("Continue the following text in a coherent and engaging style with "
                        "less than 40 words.")
PLAIN_TEXT = "text"  # the task name of plain-text (language modelling) examples

# The BLSP format as a chat template: user turns become `###[Human]:...\n\n\n`, assistant
# turns `###[Assistant]:...</s>`; the generation prompt is `###[Assistant]:`. A system
# message (BLSP has none) is written first, followed by the separator.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '###[Human]:' + message['content'] + '\\n\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '###[Assistant]:' + message['content'] + eos_token }}"
    "{%- else %}"
    "{{- message['content'] + '\\n\\n\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '###[Assistant]:' }}"
    "{%- endif %}"
)


# -- the format --------------------------------------------------------------------------------


def render_prompt(instruction: str, input_text: str | None = None) -> str:
    """`###[Human]:{instruction} {input}\\n\\n\\n###[Assistant]:` (no space when no input)."""
    body = instruction if not input_text else f"{instruction} {input_text}"
    return f"{HUMAN}{body}{SEPARATOR}{ASSISTANT}"


@dataclass(frozen=True)
class Example:
    """One training or evaluation example.

    For PLAIN_TEXT examples only `response` (the text) is used.
    """

    task: str
    instruction: str
    input: str
    response: str
    lang: str = "en"              # language of the input
    target_lang: str = "en"       # language of the response
    ref: str = ""                 # verse reference, e.g. "Ruth 1:1"
    wording: int = 0              # index of the instruction among the task's wordings

    @property
    def is_plain_text(self) -> bool:
        return self.task == PLAIN_TEXT

    @property
    def prompt(self) -> str:
        """What the model reads before answering ("" for plain text)."""
        return "" if self.is_plain_text else render_prompt(self.instruction, self.input)


def render_example(example: Example, eos: str = "</s>") -> str:
    """The whole example as text: prompt + response + EOS (plain text: the text + EOS)."""
    return f"{example.prompt}{example.response}{eos}"


@dataclass
class Encoded:
    """Token ids of an example; labels are -100 where nothing is learned."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_example(tokenizer, example: Example) -> Encoded:
    """Ids and labels of `example` the way BLSP builds them.

    Instruction examples: tokenizer(prompt) (with BOS) + tokenizer(response, no
    special tokens) + EOS; labels cover exactly the response and EOS. Plain
    text: BOS + text + EOS, every token after BOS learned.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token: the model could not learn to stop")
    response = tokenizer(example.response, add_special_tokens=False).input_ids + [eos]
    if example.is_plain_text:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return Encoded(bos + response, [-100] * len(bos) + response)
    prompt = tokenizer(example.prompt).input_ids
    return Encoded(prompt + response, [-100] * len(prompt) + response)


def encode_examples(tokenizer, examples: Sequence[Example]) -> list[Encoded]:
    """`encode_example` for many examples at once (batched tokenizer calls, same ids)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token: the model could not learn to stop")
    if not examples:
        return []
    responses = tokenizer([e.response for e in examples], add_special_tokens=False).input_ids
    prompted = [i for i, e in enumerate(examples) if not e.is_plain_text]
    prompts = tokenizer([examples[i].prompt for i in prompted]).input_ids if prompted else []
    prompt_of = dict(zip(prompted, prompts, strict=True))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out = []
    for i, response in enumerate(responses):
        response = list(response) + [eos]
        prefix = list(prompt_of.get(i, bos))
        out.append(Encoded(prefix + response, [-100] * len(prefix) + response))
    return out


@dataclass(frozen=True)
class PromptParts:
    """Prompt ids split around the input: prefix + input + suffix == tokenizer(prompt)."""

    prefix: list[int]   # BOS + `###[Human]:{instruction}`
    input: list[int]    # ` {input}` (the ids the text LLM reads where speech will go)
    suffix: list[int]   # `\\n\\n\\n###[Assistant]:`


_PLACEHOLDER = "Amen"


def prompt_parts(tokenizer, instruction: str, input_text: str | None = None) -> PromptParts:
    """Split the ids of `render_prompt(instruction, input_text)` around the input.

    With `input_text=None` the prefix and suffix are those of any input (the
    input part is empty): what a speech model puts around the speech
    embeddings so the LLM sees the same ids it saw around text. Raises
    ValueError when a token straddles the input's boundary (then no clean
    split exists for this tokenizer).
    """
    text = _PLACEHOLDER if input_text is None else input_text
    if not text.strip():
        raise ValueError("prompt_parts: the input text is empty")
    prompt = render_prompt(instruction, text)
    start = len(HUMAN) + len(instruction)            # the space before the input
    end = start + 1 + len(text)                      # where the separator starts
    encoding = tokenizer(prompt, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    special = set(tokenizer.all_special_ids)
    cut_a = cut_b = None
    for pos, ((a, b), token) in enumerate(zip(offsets, ids, strict=True)):
        if token in special and a == b:
            continue
        if cut_a is None and b > start:
            cut_a = pos
            if a < start:
                raise ValueError(f"prompt_parts: token {pos} spans the start of the input")
        if cut_b is None and b > end:
            cut_b = pos
            if a < end:
                raise ValueError(f"prompt_parts: token {pos} spans the end of the input")
    if cut_a is None or cut_b is None:
        raise ValueError("prompt_parts: could not locate the input in the prompt's tokens")
    return PromptParts(list(ids[:cut_a]), [] if input_text is None else list(ids[cut_a:cut_b]),
                       list(ids[cut_b:]))


# -- verses and their neighbours ------------------------------------------------------------------


def _chapter(ref: str) -> str:
    return ref.rsplit(":", 1)[0]


@dataclass(frozen=True)
class VerseContext:
    """A verse and the verses that follow it in its chapter (the natural continuation)."""

    verse: Verse
    following: tuple[Verse, ...] = ()


def chapter_contexts(verses: Sequence[Verse], *, lookahead: int = 3) -> list[VerseContext]:
    """A VerseContext per verse, with up to `lookahead` following verses of its chapter.

    `verses` must be in canonical order; a gap (a verse filtered out) ends the
    run of followers, so a continuation is always the verse that really comes next.
    """
    index = {v.ref: i for i, v in enumerate(load_verses())}
    out = []
    for pos, verse in enumerate(verses):
        following = []
        for nxt in verses[pos + 1: pos + 1 + lookahead]:
            expected = index.get(verse.ref, -2) + 1 + len(following)
            if index.get(nxt.ref) != expected or _chapter(nxt.ref) != _chapter(verse.ref):
                break
            following.append(nxt)
        out.append(VerseContext(verse, tuple(following)))
    return out


def heldout_books() -> frozenset[str]:
    """Books of the embedded speech corpus's dev and test splits (every language)."""
    from ..pipelines.embedded_corpus import EMBEDDED

    return frozenset(book for spec in EMBEDDED.values()
                     for split, split_spec in spec.splits.items() if split != "train"
                     for book in split_spec.books)


def split_training_verses(verses: Sequence[Verse] | None = None
                          ) -> tuple[list[Verse], list[Verse]]:
    """(training verses, held-out verses), both in canonical order.

    Held out: every verse of `heldout_books()`. Training: the rest, minus any
    verse whose English or Spanish text equals a held-out one (parallel
    passages recur across books).
    """
    if verses is None:
        train, heldout = _default_split()
        return list(train), list(heldout)
    books = heldout_books()
    heldout = [v for v in verses if v.book in books]
    keys = {normalized_key(v.en) for v in heldout} | {normalized_key(v.es) for v in heldout}
    train = [v for v in verses if v.book not in books
             and normalized_key(v.en) not in keys and normalized_key(v.es) not in keys]
    return train, heldout


@functools.lru_cache(maxsize=1)
def _default_split() -> tuple[tuple[Verse, ...], tuple[Verse, ...]]:
    train, heldout = split_training_verses(load_verses())
    return tuple(train), tuple(heldout)


def eval_contexts(split: str = "test", lang: str = "en", *, lookahead: int = 3
                  ) -> list[VerseContext]:
    """The verses the embedded speech corpus speaks in `split` ("dev"/"test"), in its order,
    with their chapter followers (read from the text corpus; no audio is built)."""
    from ..pipelines.embedded_corpus import EMBEDDED, plan_split

    if split == "train":
        raise ValueError("eval_contexts is for the held-out splits 'dev' and 'test'")
    verses = load_verses()
    index = {v.ref: i for i, v in enumerate(verses)}
    contexts = []
    for item in plan_split(EMBEDDED[lang], split):
        i = index[item["ref"]]
        following = []
        for nxt in verses[i + 1: i + 1 + lookahead]:
            if _chapter(nxt.ref) != _chapter(verses[i].ref):
                break
            following.append(nxt)
        contexts.append(VerseContext(verses[i], tuple(following)))
    return contexts


# -- the tasks ----------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return text.split()


def _truncate_words(text: str, max_words: int) -> str:
    words = _words(text)
    return text if len(words) <= max_words else " ".join(words[:max_words])


def _continuation(ctx: VerseContext, max_words: int = 39, max_verses: int = 1,
                  lang: str = "en") -> str | None:
    """The next verse(s) of the chapter, at most `max_words` words (BLSP asks for < 40)."""
    if not ctx.following:
        return None
    parts: list[str] = []
    for verse in ctx.following[:max_verses]:
        text = verse.text(lang)
        if parts and len(_words(" ".join(parts + [text]))) > max_words:
            break
        parts.append(text)
    return _truncate_words(" ".join(parts), max_words)


_WORD_CHARS = re.compile(r"[^\w'’-]+")


def last_word(text: str) -> str:
    """The last word of `text` without surrounding punctuation ("earth." -> "earth")."""
    for token in reversed(_words(text)):
        word = _WORD_CHARS.sub("", token).strip("'’-")
        if word:
            return word
    return ""


def scrambled(text: str, rng: random.Random) -> str:
    """The words of `text` in an order drawn from `rng`."""
    words = _words(text)
    rng.shuffle(words)
    return " ".join(words)


_GOD = re.compile(r"\bGod\b")


def mentions_god(text: str) -> bool:
    """True when the English text names God ("God", "God's"; not "gods")."""
    return bool(_GOD.search(text))


@dataclass(frozen=True)
class Task:
    """An instruction task: wordings (first = canonical), a builder and a scorer."""

    name: str
    instructions: tuple[str, ...]
    lang: str                                   # input language
    target_lang: str                            # response language
    metric: str                                 # headline metric (see `score`)
    respond: Callable[[VerseContext], str | None]  # the reference response, None: unusable
    higher_is_better: bool = True
    stratify: Callable[[Verse], str] | None = None  # balance training/eval over these labels
    description: str = ""
    max_new_tokens: int = 64

    # Random rewriting of the input text (e.g. shuffling its words); training draws a fresh
    # one per example, evaluation a fixed one per verse.
    transform: Callable[[str, random.Random], str] | None = None
    copies_input: bool = False                  # the response is the (transformed) input

    def input_text(self, ctx: VerseContext, rng: random.Random | None = None) -> str:
        text = ctx.verse.text(self.lang)
        if self.transform is None:
            return text
        return self.transform(text, rng or random.Random(f"{self.name}|{ctx.verse.ref}"))

    def build(self, ctx: VerseContext, wording: int = 0,
              rng: random.Random | None = None) -> Example | None:
        """The example for `ctx` with instruction `wording`, or None if the verse does not fit.
        `rng` draws the input's random rewriting, if the task has one."""
        response = self.respond(ctx)
        if not response:
            return None
        text = self.input_text(ctx, rng)
        if self.copies_input:
            response = text
        return Example(task=self.name, instruction=self.instructions[wording],
                       input=text, response=response, lang=self.lang,
                       target_lang=self.target_lang, ref=ctx.verse.ref, wording=wording)

    def score(self, refs: Sequence[str], hyps: Sequence[str],
              inputs: Sequence[str] = ()) -> dict[str, float]:
        """Scores of hypotheses against references (see the module's metrics)."""
        return _SCORERS[self.metric](self, refs, hyps, inputs)


def _score_transcript(task: Task, refs, hyps, inputs) -> dict[str, float]:
    from ..eval.metrics import cer, wer, word_recall

    exact = sum(r.strip() == h.strip() for r, h in zip(refs, hyps, strict=True))
    return {"wer": wer(refs, hyps, lang=task.target_lang),
            "cer": cer(refs, hyps, lang=task.target_lang),
            "word_recall": word_recall(refs, hyps, lang=task.target_lang),
            "exact": exact / max(len(refs), 1)}


def _score_translation(task: Task, refs, hyps, inputs) -> dict[str, float]:
    from ..eval.metrics import bleu, chrf

    return {"bleu": bleu(refs, hyps), "chrf": chrf(refs, hyps)}


def _answer_key(text: str) -> str:
    return " ".join(_WORD_CHARS.sub(" ", text.lower()).split())


def _score_answer(task: Task, refs, hyps, inputs) -> dict[str, float]:
    from collections import Counter

    keys = [_answer_key(r) for r in refs]
    correct = sum(k == _answer_key(h) for k, h in zip(keys, hyps, strict=True))
    counts = Counter(keys)
    majority = counts.most_common(1)[0][1] if keys else 0
    scores = {"accuracy": correct / max(len(refs), 1), "chance": majority / max(len(refs), 1)}
    if task.stratify is not None and keys:
        # A fixed answer set (yes/no): items drawn as they come are unbalanced (a tenth of
        # the test verses mention God), so always answering "no" scores 89% accuracy. The
        # mean recall over the answers is 50% for any constant answer.
        hits = Counter(k for k, h in zip(keys, hyps, strict=True) if k == _answer_key(h))
        scores["balanced_accuracy"] = sum(hits[k] / n for k, n in counts.items()) / len(counts)
    return scores


def _score_continuation(task: Task, refs, hyps, inputs) -> dict[str, float]:
    """Generated continuations have no single right answer: report their length, how often
    they merely copy the input, and chrF against the real next verse (a weak signal)."""
    from ..eval.metrics import chrf

    lengths = [len(_words(h)) for h in hyps]
    copies = sum(bool(h.strip()) and _answer_key(h) == _answer_key(i)
                 for h, i in zip(hyps, inputs, strict=False))
    return {"chrf": chrf(refs, hyps), "mean_words": sum(lengths) / max(len(lengths), 1),
            "over_40_words": sum(n >= 40 for n in lengths) / max(len(lengths), 1),
            "copies_input": copies / max(len(hyps), 1)}


_SCORERS = {"wer": _score_transcript, "bleu": _score_translation, "accuracy": _score_answer,
            "perplexity": _score_continuation}


def _task(name, instructions, lang, target_lang, metric, respond, **kw) -> Task:
    return Task(name=name, instructions=tuple(instructions), lang=lang, target_lang=target_lang,
                metric=metric, respond=respond, higher_is_better=metric not in ("wer",
                                                                               "perplexity"),
                **kw)


# Why two wordings for repeat/translate: after BLSP alignment the speech embeddings stand in
# for the transcript, so zero-shot speech ASR works best with an instruction the LLM already
# follows on text. The canonical wording ("Repeat the following text exactly.") is that
# instruction; BLSP's own inference wording ("Please transcribe the following audio into
# English text.") is trained as a paraphrase on the same text inputs, so the paper's prompts
# work too.
TASKS: dict[str, Task] = {t.name: t for t in [
    _task("continue", [CONTINUE_INSTRUCTION], "en", "en", "perplexity",
          lambda ctx: _continuation(ctx),
          description="the next verse of the chapter (< 40 words): BLSP's stage-1 task"),
    _task("repeat", ["Repeat the following text exactly.",
                     "Please transcribe the following audio into English text."],
          "en", "en", "wer", lambda ctx: ctx.verse.en, copies_input=True,
          description="the input itself: zero-shot ASR once speech replaces the text"),
    _task("repeat_scrambled", ["Repeat the following text exactly.",
                               "Please transcribe the following audio into English text."],
          "en", "en", "wer", lambda ctx: ctx.verse.en, transform=scrambled, copies_input=True,
          description="a verse's words freshly shuffled, repeated: only copying predicts it, "
                      "so it teaches (and measures) copying rather than recalling the verse"),
    _task("repeat_es", ["Repeat the following text exactly.",
                        "Please transcribe the following audio into Spanish text."],
          "es", "es", "wer", lambda ctx: ctx.verse.es, copies_input=True,
          description="the Spanish input itself (Spanish zero-shot ASR)"),
    _task("translate_es", ["Translate the following text into Spanish.",
                           "Please translate the following audio into Spanish text."],
          "en", "es", "bleu", lambda ctx: ctx.verse.es,
          description="the Spanish verse for an English one (zero-shot speech translation)"),
    _task("translate_en", ["Translate the following text into English.",
                           "Please translate the following audio into English text."],
          "es", "en", "bleu", lambda ctx: ctx.verse.en,
          description="the English verse for a Spanish one"),
    _task("last_word", ["What is the last word of the following text?"], "en", "en",
          "accuracy", lambda ctx: last_word(ctx.verse.en), max_new_tokens=8,
          description="spoken-QA style: the last word, without punctuation"),
    _task("mentions_god", ["Does the following text mention God? Answer yes or no."],
          "en", "en", "accuracy", lambda ctx: "yes" if mentions_god(ctx.verse.en) else "no",
          stratify=lambda verse: "yes" if mentions_god(verse.en) else "no", max_new_tokens=4,
          description="spoken-QA style yes/no, balanced (chance 50%)"),
]}


def get_task(name: str) -> Task:
    """The task called `name`, with the known names in the error."""
    if name not in TASKS:
        raise KeyError(f"unknown instruction task {name!r}; known: {', '.join(TASKS)} "
                       f"(and {PLAIN_TEXT!r} for plain text)")
    return TASKS[name]


# -- building datasets --------------------------------------------------------------------------


def _draw(pool: Sequence[VerseContext], count: int, rng: random.Random) -> list[VerseContext]:
    """`count` contexts: whole shuffled passes over `pool`, so each is used evenly."""
    out: list[VerseContext] = []
    while len(out) < count and pool:
        order = list(pool)
        rng.shuffle(order)
        out.extend(order[: count - len(out)])
    return out


def _strata(task: Task, contexts: Sequence[VerseContext]) -> list[list[VerseContext]]:
    if task.stratify is None:
        return [list(contexts)]
    groups: dict[str, list[VerseContext]] = {}
    for ctx in contexts:
        groups.setdefault(task.stratify(ctx.verse), []).append(ctx)
    return [groups[k] for k in sorted(groups)]


def build_task_examples(task: Task, contexts: Sequence[VerseContext], count: int, *,
                        seed: int = 0, paraphrase_prob: float = 0.3,
                        max_input_words: int | None = None) -> list[Example]:
    """`count` training examples of `task` from `contexts` (balanced over the task's strata).

    The canonical wording is used with probability 1 - paraphrase_prob, the
    others share the rest. Verses with more than `max_input_words` words are
    not used as inputs (keeps sequences short).
    """
    rng = random.Random(f"{seed}-{task.name}")
    usable = [c for c in contexts if task.respond(c)
              and (max_input_words is None
                   or len(_words(c.verse.text(task.lang))) <= max_input_words)]
    strata = [s for s in _strata(task, usable) if s]
    examples: list[Example] = []
    for pos, stratum in enumerate(strata):
        share = count // len(strata) + (1 if pos < count % len(strata) else 0)
        for ctx in _draw(stratum, share, rng):
            wording = 0
            if len(task.instructions) > 1 and rng.random() < paraphrase_prob:
                wording = rng.randrange(1, len(task.instructions))
            example = task.build(ctx, wording, rng)
            if example is not None:
                examples.append(example)
    rng.shuffle(examples)
    return examples


def plain_text_examples(verses: Sequence[Verse], count: int, *, seed: int = 0,
                        max_words: int = 64, langs: Mapping[str, float] | None = None
                        ) -> list[Example]:
    """`count` plain-text passages: runs of consecutive verses of one chapter, up to
    `max_words` words, in English or Spanish (`langs`: language -> weight)."""
    langs = dict(langs or {"en": 0.6, "es": 0.4})
    rng = random.Random(f"{seed}-{PLAIN_TEXT}")
    contexts = chapter_contexts(verses, lookahead=8)
    names, weights = list(langs), list(langs.values())
    out = []
    for ctx in _draw(contexts, count, rng):
        lang = rng.choices(names, weights)[0]
        text = ctx.verse.text(lang)
        for nxt in ctx.following:
            candidate = f"{text} {nxt.text(lang)}"
            if len(_words(candidate)) > max_words:
                break
            text = candidate
        text = _truncate_words(text, max_words)
        out.append(Example(task=PLAIN_TEXT, instruction="", input="", response=text, lang=lang,
                           target_lang=lang, ref=ctx.verse.ref))
    return out


def build_examples(mixture: Mapping[str, float], verses: Sequence[Verse], total: int, *,
                   seed: int = 0, paraphrase_prob: float = 0.3,
                   max_input_words: int | None = None, plain_text_words: int = 64
                   ) -> list[Example]:
    """About `total` examples mixed by `mixture` (task name or PLAIN_TEXT -> weight), shuffled."""
    if not mixture or any(w < 0 for w in mixture.values()) or sum(mixture.values()) <= 0:
        raise ValueError(f"the task mixture needs positive weights, got {dict(mixture)}")
    for name in mixture:
        if name != PLAIN_TEXT:
            get_task(name)
    contexts = chapter_contexts(verses)
    weight_sum = sum(mixture.values())
    examples: list[Example] = []
    for name, weight in mixture.items():
        count = round(total * weight / weight_sum)
        if count == 0:
            continue
        if name == PLAIN_TEXT:
            examples += plain_text_examples(verses, count, seed=seed, max_words=plain_text_words)
        else:
            examples += build_task_examples(TASKS[name], contexts, count, seed=seed,
                                            paraphrase_prob=paraphrase_prob,
                                            max_input_words=max_input_words)
    random.Random(f"{seed}-mixture").shuffle(examples)
    return examples


def eval_examples(task: Task, contexts: Sequence[VerseContext], *, limit: int | None = None,
                  wording: int = 0) -> list[Example]:
    """One example per usable context (instruction `wording`), in context order, balanced
    over the task's strata (each stratum cut to the smallest), at most `limit` in all."""
    usable = [c for c in contexts if task.respond(c)]
    strata = [s for s in _strata(task, usable) if s]
    if not strata:
        return []
    per = min(len(s) for s in strata)
    if limit is not None:
        per = min(per, max(1, limit // len(strata)))
    keep = {id(c) for s in strata for c in s[:per]}
    return [e for e in (task.build(c, wording) for c in usable if id(c) in keep) if e is not None]


def with_wording(examples: Iterable[Example], wording: int) -> list[Example]:
    """The same examples with instruction wording `wording` of their task."""
    return [replace(e, instruction=TASKS[e.task].instructions[wording], wording=wording)
            for e in examples]
