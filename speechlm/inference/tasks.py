"""Task prompts for a SpeechLM: ASR, speech translation, spoken QA and multi-turn chat.

A `TaskPrompt` says what to ask about a recording; `encode_task_prompt` turns
it into an `EncodedPrompt` (token runs with speech slots) in the model's own
template, so inference reads exactly the format the adapter was trained on:

    prompt = TaskPrompt("st", target_lang="es")
    task_instruction(prompt)   # 'Please translate the following audio into Spanish text.'
    encoded = encode_task_prompt(model.template, model.tokenizer, prompt)

Tasks and their instruction (the text before the speech slot):
- "asr": "Please transcribe the following audio into {Language} text." (`lang`,
  default English);
- "st": "Please translate the following audio into {Language} text."
  (`target_lang` required);
- "sqa": a question in text (`question`) is the instruction itself, the way
  the embedded instruction tasks ask about "the following text"; without a
  text question the question is spoken, and the instruction is
  "Please answer the question in the following audio.";
- "chat": `messages`, a conversation of {"role", "content"} dicts whose
  contents hold speech slots, written `<speech>` (or SPEECH_PLACEHOLDER);
  each slot takes one clip of the request, in order. Without messages, one
  user turn: the `question` (if any) and the speech.
`instruction` overrides the wording of asr / st / sqa.

The ASR and translation wordings are BLSP's inference instructions (SPECS.md);
for English and Spanish they are read from the instruction catalogue
(`speechlm.data.instructions.TASKS`, the wording trained as a paraphrase
there), so the zoo model is asked exactly what it learned.

Chat in the BLSP template (an LLM without a chat template) follows
`speechlm.data.instructions.CHAT_TEMPLATE`: `###[Human]:{user}\\n\\n\\n`,
`###[Assistant]:{reply}</s>`, generation prompt `###[Assistant]:`; a
single-turn chat is then token for token the BLSP task prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from ..models.prompts import (
    BLSP_PREFIX,
    BLSP_SUFFIX,
    SPEECH_PLACEHOLDER,
    BlspTemplate,
    ChatTemplate,
    EncodedPrompt,
    PromptTemplate,
    encode_continuing,
)

__all__ = [
    "LANGUAGE_NAMES", "SPEECH", "TASK_NAMES", "TaskPrompt", "chat_messages",
    "encode_blsp_messages", "encode_task_prompt", "language_name", "task_instruction",
]

TASK_NAMES = ("asr", "st", "sqa", "chat")
SPEECH = "<speech>"  # how users write a speech slot in chat messages

ASR_WORDING = "Please transcribe the following audio into {language} text."
ST_WORDING = "Please translate the following audio into {language} text."
SPOKEN_QUESTION_WORDING = "Please answer the question in the following audio."

# BLSP_SUFFIX is the turn separator followed by the assistant's generation prompt
BLSP_ASSISTANT = "###[Assistant]:"
BLSP_SEPARATOR = BLSP_SUFFIX[: -len(BLSP_ASSISTANT)]

LANGUAGE_NAMES = {
    "ain": "Ainu", "ar": "Arabic", "bn": "Bengali", "ca": "Catalan", "cs": "Czech",
    "de": "German", "el": "Greek", "en": "English", "es": "Spanish", "fa": "Persian",
    "fi": "Finnish", "fr": "French", "gu": "Gujarati", "he": "Hebrew", "hi": "Hindi",
    "id": "Indonesian", "it": "Italian", "ja": "Japanese", "kn": "Kannada", "ko": "Korean",
    "ml": "Malayalam", "mr": "Marathi", "nl": "Dutch", "or": "Odia", "pa": "Punjabi",
    "pl": "Polish", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sv": "Swedish",
    "sw": "Swahili", "ta": "Tamil", "te": "Telugu", "th": "Thai", "tr": "Turkish",
    "uk": "Ukrainian", "ur": "Urdu", "vi": "Vietnamese", "zh": "Chinese",
}

# (task, language code) -> the catalogue task whose speech wording to use
_CATALOGUE = {("asr", "en"): "repeat", ("asr", "es"): "repeat_es",
              ("st", "es"): "translate_es", ("st", "en"): "translate_en"}


def language_name(code_or_name: str) -> str:
    """"es" / "es-ES" -> "Spanish"; a name ("German") is kept as written.

    An unknown code (2-3 lower-case letters) is a ConfigError asking for the name.
    """
    text = str(code_or_name).strip()
    base = text.replace("_", "-").split("-")[0].lower()
    if base in LANGUAGE_NAMES:
        return LANGUAGE_NAMES[base]
    if not text or (text.islower() and len(base) <= 3 and "-" not in text.strip("-")):
        raise ConfigError(f"unknown language code {code_or_name!r}; give the language's name "
                          f"instead (e.g. --target-lang German) or one of: "
                          f"{', '.join(sorted(LANGUAGE_NAMES))}")
    return text


def _catalogue_wording(task: str, lang: str) -> str | None:
    """The speech wording of the instruction catalogue for (task, lang), if it has one."""
    name = _CATALOGUE.get((task, lang.replace("_", "-").split("-")[0].lower()))
    if name is None:
        return None
    try:
        from ..data.instructions import TASKS
    except ImportError:  # catalogue not available: the paper's wording below is the same
        return None
    entry = TASKS.get(name)
    wordings = [w for w in (entry.instructions if entry else ()) if "audio" in w]
    return wordings[0] if wordings else None


@dataclass(frozen=True)
class TaskPrompt:
    """What to ask about a recording (see the module doc for each task's fields)."""

    task: str = "asr"
    lang: str | None = None            # asr: language of the speech (default English)
    target_lang: str | None = None     # st: language to translate into (required)
    question: str | None = None        # sqa / chat: a question in text
    messages: tuple[dict, ...] | None = None  # chat: the conversation, with <speech> slots
    instruction: str | None = None     # asr / st / sqa: use this wording instead

    def __post_init__(self):
        if isinstance(self.messages, list):  # keep the dataclass hashable-ish and immutable
            object.__setattr__(self, "messages", tuple(self.messages))

    def validate(self) -> None:
        """ConfigError when the task or its arguments do not fit together."""
        if self.task not in TASK_NAMES:
            raise ConfigError(f"unknown task {self.task!r}; choose one of {', '.join(TASK_NAMES)}")
        if self.task == "st" and not self.target_lang and not self.instruction:
            raise ConfigError("task 'st' needs the target language: give target_lang "
                              "(CLI: --target-lang es)")
        if self.messages is not None:
            if self.task != "chat":
                raise ConfigError(f"messages are for task 'chat', not {self.task!r}")
            _check_messages(self.messages)
        if self.task == "chat" and self.instruction:
            raise ConfigError("task 'chat' takes messages (or a question), not an instruction")
        if self.lang:
            language_name(self.lang)
        if self.target_lang:
            language_name(self.target_lang)

    @property
    def num_speech(self) -> int:
        """How many clips the prompt takes (1, except chat messages with several slots)."""
        if self.messages is None:
            return 1
        return sum(_count_slots(m.get("content")) for m in self.messages if isinstance(m, dict))

    @property
    def segmentable(self) -> bool:
        """asr and st can run on a long recording piece by piece and join the texts;
        a question or a conversation needs the recording whole."""
        return self.task in ("asr", "st")

    @property
    def output_lang(self) -> str | None:
        return self.target_lang if self.task == "st" else self.lang


def _count_slots(content) -> int:
    if not isinstance(content, str):
        return 0
    return content.count(SPEECH) + content.count(SPEECH_PLACEHOLDER)


def _check_messages(messages: Sequence[dict]) -> None:
    if not isinstance(messages, (list, tuple)):
        raise ConfigError(f"chat messages must be a list of {{'role', 'content'}} objects, got "
                          f"{type(messages).__name__}")
    if not messages:
        raise ConfigError("chat messages are empty; give at least one user turn")
    for pos, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                or message.get("role") not in ("system", "user", "assistant"):
            raise ConfigError(f"chat message {pos} must be {{'role': 'system'|'user'|'assistant', "
                              f"'content': str}}, got {message!r}")
        if message["role"] != "user" and _count_slots(message["content"]):
            raise ConfigError(f"chat message {pos}: only user turns can hold {SPEECH}")
    if messages[-1]["role"] != "user":
        raise ConfigError("the last chat message must be a user turn (the model answers it)")


def task_instruction(prompt: TaskPrompt) -> str:
    """The instruction text of an asr / st / sqa prompt (see the module doc)."""
    if prompt.instruction:
        return prompt.instruction
    if prompt.task in ("asr", "st"):
        lang = (prompt.lang or "en") if prompt.task == "asr" else prompt.target_lang
        wording = _catalogue_wording(prompt.task, lang)
        if wording is not None:
            return wording
        pattern = ASR_WORDING if prompt.task == "asr" else ST_WORDING
        return pattern.format(language=language_name(lang))
    if prompt.task == "sqa":
        return prompt.question.strip() if prompt.question else SPOKEN_QUESTION_WORDING
    raise ConfigError(f"task {prompt.task!r} has no single instruction; use chat_messages")


def chat_messages(prompt: TaskPrompt, template: PromptTemplate) -> list[dict]:
    """The conversation of a chat prompt with speech slots as SPEECH_PLACEHOLDER (a system
    prompt of a chat template comes first unless the messages have their own)."""
    if prompt.messages is not None:
        messages = [{"role": m["role"],
                     "content": m["content"].replace(SPEECH, SPEECH_PLACEHOLDER)}
                    for m in prompt.messages]
    else:
        question = (prompt.question or "").strip()
        if isinstance(template, ChatTemplate):
            content = template.user_content(question, SPEECH_PLACEHOLDER)
        else:
            content = question + SPEECH_PLACEHOLDER  # BLSP: instruction, then the speech
        messages = [{"role": "user", "content": content}]
    system = getattr(template, "system_prompt", None)
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def encode_blsp_messages(tokenizer, messages: Sequence[dict]) -> EncodedPrompt:
    """A conversation in the BLSP format (see the module doc), speech slots split out.

    Token runs are built the way BlspTemplate builds its prompt: the first run
    with the tokenizer's special tokens (BOS), the rest without, and the EOS
    id after each assistant turn.
    """
    eos = tokenizer.eos_token_id
    # parts: text, None (a speech slot) or an int (a token id: EOS)
    parts: list[str | int | None] = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "user":
            text = f"{BLSP_PREFIX}{content}{BLSP_SEPARATOR}"
        elif role == "assistant":
            text = f"{BLSP_ASSISTANT}{content}"
        else:
            text = f"{content}{BLSP_SEPARATOR}"
        for i, chunk in enumerate(text.split(SPEECH_PLACEHOLDER)):
            if i:
                parts.append(None)
            parts.append(chunk)
        if role == "assistant" and eos is not None:
            parts.append(int(eos))
    parts.append(BLSP_ASSISTANT)  # the generation prompt

    pieces: list[list[int] | None] = []
    run: list[int] = []
    pending = ""
    first = True
    after_speech = False
    for part in [*parts, None]:  # a final None flushes the last run
        if isinstance(part, str):
            pending += part  # consecutive text is tokenized as one string
            continue
        if pending:
            if after_speech:  # the ids text has after other text (no dummy-prefix "▁")
                run.extend(encode_continuing(tokenizer, pending))
            else:
                run.extend(tokenizer(pending, add_special_tokens=first)["input_ids"])
            pending = ""
            first = False
        after_speech = part is None
        if isinstance(part, int):
            run.append(part)
        else:
            pieces.append(run)
            pieces.append(None)
            run = []
    return EncodedPrompt(pieces[:-1])  # drop the flushing slot


def encode_task_prompt(template: PromptTemplate, tokenizer, prompt: TaskPrompt) -> EncodedPrompt:
    """The prompt of `prompt` in `template` (the model's), with its speech slot(s)."""
    prompt.validate()
    if prompt.task != "chat":
        return template.encode(tokenizer, task_instruction(prompt))
    messages = chat_messages(prompt, template)
    if isinstance(template, ChatTemplate):
        return template.encode_messages(tokenizer, messages)
    if isinstance(template, BlspTemplate):
        return encode_blsp_messages(tokenizer, messages)
    raise ConfigError(f"template {template.name!r} cannot hold a multi-turn chat; use 'chat' "
                      "(the LLM's chat template) or 'blsp'")
