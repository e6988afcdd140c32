"""The embedded corpus recipe: deterministic, and disjoint across splits in text and voice."""

from speechlm.data.text_corpus import load_verses, normalized_key
from speechlm.pipelines.embedded_corpus import EMBEDDED, SPLITS, plan_split


def test_text_corpus_is_aligned_english_spanish():
    verses = load_verses()
    assert len(verses) > 30000
    first = verses[0]
    assert first.ref == "Genesis 1:1" and first.book == "Genesis"
    assert "beginning" in first.en and "principio" in first.es


def test_plan_is_deterministic():
    spec = EMBEDDED["en"]
    assert plan_split(spec, "train") == plan_split(spec, "train")


def test_splits_share_no_text_voice_or_book():
    for spec in EMBEDDED.values():
        plans = {s: plan_split(spec, s) for s in SPLITS}
        for split, items in plans.items():
            assert len(items) == spec.splits[split].size
            assert len({it["id"] for it in items}) == len(items)
        train_texts = {normalized_key(it["text"]) for it in plans["train"]}
        train_voices = {it["voice"] for it in plans["train"]}
        train_books = {it["ref"].rsplit(" ", 1)[0] for it in plans["train"]}
        for held_out in ("dev", "test"):
            items = plans[held_out]
            assert not train_texts & {normalized_key(it["text"]) for it in items}
            assert not train_voices & {it["voice"] for it in items}
            assert not train_books & {it["ref"].rsplit(" ", 1)[0] for it in items}


def test_items_carry_the_translation_for_speech_translation():
    item = plan_split(EMBEDDED["en"], "test")[0]
    verse = next(v for v in load_verses() if v.ref == item["ref"])
    assert item["text"] == verse.en and item["translation"] == verse.es


def test_more_training_speech_keeps_out_held_out_books_texts_and_voices():
    import dataclasses

    import pytest

    from speechlm.pipelines.embedded_corpus import more_training_speech_spec

    spec = more_training_speech_spec("en", 30077)  # every training-book verse of 1-60 words
    items = plan_split(spec, "train")
    assert len(items) == 30077 and len({it["id"] for it in items}) == len(items)
    base = EMBEDDED["en"]
    assert {it["voice"] for it in items} == set(base.splits["train"].voices)
    for held_out in ("dev", "test"):
        plan = plan_split(base, held_out)
        assert not {normalized_key(it["text"]) for it in items} & \
            {normalized_key(it["text"]) for it in plan}
        assert not {it["ref"].rsplit(" ", 1)[0] for it in items} & set(base.splits[held_out].books)
    # the training books' verses, longer ones included, beyond the 3000 of the train split
    assert max(len(it["text"].split()) for it in items) > 25
    too_many = dataclasses.replace(spec, splits={"train": dataclasses.replace(
        spec.splits["train"], size=30078)})
    with pytest.raises(ValueError, match="only 30077 verses qualify"):
        plan_split(too_many, "train")


def test_extra_speech_repeats_no_train_dev_or_test_text_and_keeps_cached_corpora_valid():
    from speechlm.pipelines.embedded_corpus import EXTRA_SIZES, extra_speech_spec

    for lang in ("es", "en"):
        items = plan_split(extra_speech_spec(lang), "extra")
        base = EMBEDDED[lang]
        assert len(items) == EXTRA_SIZES[lang] == len({it["id"] for it in items})
        assert {it["voice"] for it in items} == set(base.splits["train"].voices)
        texts = {normalized_key(it["text"]) for it in items}
        for split in SPLITS:
            assert not texts & {normalized_key(it["text"]) for it in plan_split(base, split)}
        assert all(4 <= len(it["text"].split()) <= 25 for it in items)
    # the new exclude field must not change the cache keys of corpora built before it
    assert (EMBEDDED["en"].fingerprint(), EMBEDDED["es"].fingerprint()) == \
        ("d67ba26e57", "6ab0aa6d00")


def test_an_unknown_embedded_split_names_the_extra_ones():
    import pytest

    from speechlm.errors import ConfigError
    from speechlm.recipes.sources import resolve_manifest

    with pytest.raises(ConfigError, match="embedded:es/extra"):
        resolve_manifest("embedded:es/untranscribed")
