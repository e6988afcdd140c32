"""The instruction catalogue: the BLSP format, label masks, held-out books, builders and scorers."""

from collections import Counter

import pytest

from speechlm.data import instructions as I
from speechlm.data.text_corpus import Verse, load_verses, normalized_key
from speechlm.pipelines.embedded_corpus import EMBEDDED, plan_split


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small SentencePiece tokenizer in the zoo LLM's format (BLSP chat template, <pad>)."""
    from transformers import AutoTokenizer

    from speechlm.recipes.text_lm import TokenizerConfig, tokenizer_lines
    from speechlm.text.tokenizer_train import save_sentencepiece_tokenizer, train_sentencepiece

    root = tmp_path_factory.mktemp("tok")
    train, _ = I.split_training_verses()
    model_file = train_sentencepiece(tokenizer_lines(train, every=20), 600, roots=[root],
                                     pad_id=3, pad_piece="<pad>")
    assert TokenizerConfig().vocab_size >= 4000  # the zoo's default; this one is smaller
    save_sentencepiece_tokenizer(model_file, root / "hf", chat_template=I.CHAT_TEMPLATE,
                                 pad_token="<pad>")
    return AutoTokenizer.from_pretrained(root / "hf")


VERSE = Verse("Ruth 1:16", "Ruth said, “Don’t urge me to leave you.”", "Respondió Ruth: No me ruegues.")


# -- the format ---------------------------------------------------------------------------------


def test_prompt_is_exactly_the_blsp_template():
    assert I.render_prompt(I.CONTINUE_INSTRUCTION, "In the beginning.") == (
        "###[Human]:Continue the following text in a coherent and engaging style with less than "
        "40 words. In the beginning.\n\n\n###[Assistant]:")
    example = I.TASKS["repeat"].build(I.VerseContext(VERSE))
    assert I.render_example(example) == (
        "###[Human]:Repeat the following text exactly. Ruth said, “Don’t urge me to leave you.”"
        "\n\n\n###[Assistant]:Ruth said, “Don’t urge me to leave you.”</s>")
    assert I.render_prompt("Please transcribe the following audio into English text.") == (
        "###[Human]:Please transcribe the following audio into English text.\n\n\n###[Assistant]:")


def test_chat_template_renders_the_blsp_format(tokenizer):
    instruction = "Translate the following text into Spanish."
    user = {"role": "user", "content": f"{instruction} {VERSE.en}"}
    prompt = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert prompt == I.render_prompt(instruction, VERSE.en)
    full = tokenizer.apply_chat_template([user, {"role": "assistant", "content": VERSE.es}],
                                         tokenize=False)
    example = I.TASKS["translate_es"].build(I.VerseContext(VERSE))
    assert full == I.render_example(example, eos=tokenizer.eos_token)


def test_loss_mask_covers_exactly_the_response_and_eos(tokenizer):
    for name, task in I.TASKS.items():
        ctx = I.VerseContext(VERSE, (Verse("Ruth 1:17", "Where you die, I will die.", "Donde tú murieres."),))
        example = task.build(ctx)
        enc = I.encode_example(tokenizer, example)
        prompt = tokenizer(example.prompt).input_ids
        assert enc.input_ids[: len(prompt)] == prompt, name
        assert enc.labels[: len(prompt)] == [-100] * len(prompt), name
        learned = enc.input_ids[len(prompt):]
        assert enc.labels[len(prompt):] == learned, name
        assert learned[-1] == tokenizer.eos_token_id and learned.count(tokenizer.eos_token_id) == 1
        assert tokenizer.decode(learned[:-1]).strip() == example.response, name
    plain = I.Example(task=I.PLAIN_TEXT, instruction="", input="", response=VERSE.es, lang="es")
    enc = I.encode_example(tokenizer, plain)
    assert enc.input_ids[0] == tokenizer.bos_token_id and enc.labels[0] == -100
    assert enc.labels[1:] == enc.input_ids[1:] and enc.input_ids[-1] == tokenizer.eos_token_id


def test_batched_encoding_equals_one_by_one(tokenizer):
    train, _ = I.split_training_verses()
    examples = I.build_examples({"text": 1, "repeat": 1, "translate_es": 1, "mentions_god": 1},
                                train[:500], 40, seed=3)
    batched = I.encode_examples(tokenizer, examples)
    assert [(e.input_ids, e.labels) for e in batched] == [
        (e.input_ids, e.labels) for e in (I.encode_example(tokenizer, x) for x in examples)]


def test_prompt_parts_split_the_prompt_ids_around_the_input(tokenizer):
    instruction = I.TASKS["repeat"].instructions[0]
    for text in (VERSE.en, VERSE.es, "¿Quién? 1234 — ok"):
        parts = I.prompt_parts(tokenizer, instruction, text)
        assert parts.prefix + parts.input + parts.suffix == tokenizer(
            I.render_prompt(instruction, text)).input_ids
        assert tokenizer.decode(parts.input).strip() == text
        assert tokenizer.decode(parts.suffix) == "\n\n\n###[Assistant]:"
    speech = I.prompt_parts(tokenizer, instruction)  # the frame a speech model fills
    assert speech.input == [] and speech.prefix == parts.prefix and speech.suffix == parts.suffix
    assert speech.prefix[0] == tokenizer.bos_token_id
    assert tokenizer.decode(speech.prefix, skip_special_tokens=True) == "###[Human]:" + instruction


# -- held out --------------------------------------------------------------------------------------


def test_heldout_books_are_the_embedded_dev_and_test_books():
    expected = {b for spec in EMBEDDED.values() for split in ("dev", "test")
                for b in spec.splits[split].books}
    assert I.heldout_books() == expected
    assert {"Ruth", "Jonah", "Joel", "Jude"} <= I.heldout_books()


def test_heldout_verses_never_appear_in_training_examples():
    train, heldout = I.split_training_verses()
    books = I.heldout_books()
    assert heldout and all(v.book in books for v in heldout)
    assert not any(v.book in books for v in train)
    keys = {normalized_key(v.en) for v in heldout} | {normalized_key(v.es) for v in heldout}
    assert not any(normalized_key(v.en) in keys or normalized_key(v.es) in keys for v in train)
    examples = I.build_examples({name: 1.0 for name in [*I.TASKS, I.PLAIN_TEXT]}, train, 1600,
                                seed=1)
    assert Counter(e.task for e in examples).keys() == {*I.TASKS, I.PLAIN_TEXT}
    heldout_text = [normalized_key(t) for v in heldout for t in (v.en, v.es)]
    heldout_text = [t for t in heldout_text if len(t.split()) >= 6]  # skip stock phrases
    for example in examples:
        assert example.ref.rsplit(" ", 1)[0] not in books
        text = normalized_key(f"{example.input} {example.response}")
        assert not any(h in text for h in heldout_text[:: 7]), example


def test_eval_contexts_are_the_spoken_heldout_verses():
    contexts = I.eval_contexts("test", "en")
    plan = plan_split(EMBEDDED["en"], "test")
    assert [c.verse.ref for c in contexts] == [item["ref"] for item in plan]
    assert [c.verse.en for c in contexts] == [item["text"] for item in plan]
    assert all(c.verse.book in I.heldout_books() for c in contexts)
    with pytest.raises(ValueError):
        I.eval_contexts("train")


# -- builders -----------------------------------------------------------------------------------


def test_continue_is_the_next_verse_of_the_chapter_under_40_words():
    verses = load_verses()
    contexts = I.chapter_contexts(verses[:200])
    first = I.TASKS["continue"].build(contexts[0])
    assert first.instruction == I.CONTINUE_INSTRUCTION
    assert first.input == verses[0].en and first.response == verses[1].en
    last_of_chapter = next(c for c in contexts if c.verse.ref == "Genesis 1:31")
    assert last_of_chapter.following == () and I.TASKS["continue"].build(last_of_chapter) is None
    long_next = I.VerseContext(VERSE, (Verse("Ruth 1:17", " ".join(["word"] * 60), ""),))
    assert len(I.TASKS["continue"].build(long_next).response.split()) == 39
    gap = I.chapter_contexts([verses[0], verses[2]])  # 1:2 filtered out: no false continuation
    assert gap[0].following == ()


def test_qa_answers_and_balance():
    assert I.last_word("In the beginning, God created the heavens and the earth.") == "earth"
    assert I.last_word("“Don’t!”") == "Don’t"
    assert I.mentions_god("God’s Spirit") and I.mentions_god("the Lord God.")
    assert not I.mentions_god("other gods") and not I.mentions_god("godly")
    train, _ = I.split_training_verses()
    examples = I.build_task_examples(I.TASKS["mentions_god"], I.chapter_contexts(train), 400)
    assert Counter(e.response for e in examples) == {"yes": 200, "no": 200}
    held = I.eval_examples(I.TASKS["mentions_god"], I.eval_contexts("test"), limit=40)
    assert Counter(e.response for e in held) == {"yes": 20, "no": 20}


def test_paraphrase_wordings_and_mixture_proportions():
    train, _ = I.split_training_verses()
    examples = I.build_examples({"repeat": 3.0, "translate_es": 1.0}, train, 2000, seed=0,
                                paraphrase_prob=0.25)
    counts = Counter(e.task for e in examples)
    assert counts == {"repeat": 1500, "translate_es": 500}
    wordings = Counter(e.instruction for e in examples if e.task == "repeat")
    blsp = "Please transcribe the following audio into English text."
    assert 0.18 < wordings[blsp] / 1500 < 0.32 and set(wordings) == set(I.TASKS["repeat"].instructions)
    assert I.build_examples({"repeat": 3.0, "translate_es": 1.0}, train, 2000, seed=0,
                            paraphrase_prob=0.25) == examples  # deterministic
    with pytest.raises(KeyError, match="unknown instruction task 'transcribe'"):
        I.build_examples({"transcribe": 1.0}, train, 10)


def test_scorers():
    repeat = I.TASKS["repeat"]
    scores = repeat.score(["In the beginning, God.", "Amen."], ["in the beginning god", "Amen."])
    assert scores["wer"] == 0.0 and scores["exact"] == 0.5
    translate = I.TASKS["translate_es"].score(["Y dijo Dios: Sea la luz."] * 2,
                                              ["Y dijo Dios: Sea la luz."] * 2)
    assert translate["bleu"] == pytest.approx(100.0)
    qa = I.TASKS["mentions_god"].score(["yes", "no", "no", "no"], ["Yes.", "no", "yes", ""])
    assert qa == {"accuracy": 0.5, "chance": 0.75, "balanced_accuracy": pytest.approx(2 / 3)}
    always_no = I.TASKS["mentions_god"].score(["yes"] + ["no"] * 9, ["no"] * 10)
    assert always_no["accuracy"] == 0.9 and always_no["balanced_accuracy"] == 0.5
    assert "balanced_accuracy" not in I.TASKS["last_word"].score(["amen"], ["amen"])
    cont = I.TASKS["continue"].score(["And God saw the light."], ["In the beginning"],
                                     ["In the beginning."])
    assert cont["copies_input"] == 1.0 and cont["mean_words"] == 3
