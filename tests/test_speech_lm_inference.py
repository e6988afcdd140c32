"""SpeechLM inference: task prompts, batched generation equal to one-at-a-time, beam and
seeded sampling, stop strings, long audio, resumable JSONL and the CLI entry with its
bad-input reports. Models are tiny and untrained: their text is arbitrary but deterministic."""

import argparse
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from speechlm.errors import ConfigError, ManifestError, SpeechLMError
from speechlm.inference.generate_jsonl import (
    add_speech_lm_arguments,
    generate_jsonl,
    is_speech_lm_dir,
    requests_from_manifest,
    run_speech_lm_inference,
)
from speechlm.inference.speech_lm import (
    GenerationOptions,
    Request,
    SpeechLMGenerator,
    cut_at_stop_strings,
)
from speechlm.inference.tasks import TaskPrompt, encode_task_prompt, language_name, task_instruction
from speechlm.models.prompts import BLSP_SUFFIX, get_template
from speechlm.models.speech_lm import CONFIG_FILE, SpeechLM, SpeechLMConfig

SR = 16000


# one torch thread: batched and one-by-one results compare bit for bit
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _build(tiny_ckpt, encoder, llm, **fields):
    fields.setdefault("template", "chat" if llm == "qwen2" else "blsp")
    torch.manual_seed(0)
    config = SpeechLMConfig(encoder_path=str(tiny_ckpt(encoder)), llm_path=str(tiny_ckpt(llm)),
                            **fields)
    return SpeechLM.build(config).eval()


@pytest.fixture(scope="module")
def blsp_model(tiny_ckpt):
    """wav2vec2 (attention mask) + Llama (no pad token, no chat template), BLSP template."""
    return _build(tiny_ckpt, "wav2vec2", "llama", adapter="stack")


@pytest.fixture(scope="module")
def chat_model(tiny_ckpt):
    """HuBERT (no attention mask: sees batch padding) + Qwen2 (ChatML), chat template."""
    return _build(tiny_ckpt, "hubert", "qwen2", adapter="stack", system_prompt="Be brief.")


def _wave(seconds, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(int(seconds * SR), generator=gen) * 0.1


def _bursts(total_s, burst_s=2.5, gap_s=0.6, seed=0):
    """Noise bursts separated by silence: something split_on_silence can cut."""
    wave = torch.zeros(int(total_s * SR))
    pos, k = 0, 0
    while pos < wave.numel():
        n = min(int(burst_s * SR), wave.numel() - pos)
        wave[pos : pos + n] = _wave(n / SR, seed + k)[:n]
        pos += n + int(gap_s * SR)
        k += 1
    return wave


MIXED_SECONDS = [0.15, 3.9, 0.4, 2.2, 1.0, 0.25, 3.1, 0.7, 1.6, 0.3, 2.8, 0.55, 1.3, 0.2, 3.5, 0.9]


# -- task prompts ---------------------------------------------------------------------


def test_task_instructions_use_the_blsp_wording():
    assert task_instruction(TaskPrompt("asr")) == \
        "Please transcribe the following audio into English text."
    assert task_instruction(TaskPrompt("st", target_lang="es")) == \
        "Please translate the following audio into Spanish text."
    assert task_instruction(TaskPrompt("st", target_lang="de-DE")) == \
        "Please translate the following audio into German text."
    assert task_instruction(TaskPrompt("st", target_lang="Klingon")) == \
        "Please translate the following audio into Klingon text."
    assert task_instruction(TaskPrompt("sqa", question=" Who speaks? ")) == "Who speaks?"
    assert "question in the following audio" in task_instruction(TaskPrompt("sqa"))
    assert task_instruction(TaskPrompt("asr", instruction="Repeat.")) == "Repeat."
    assert language_name("pt-BR") == "Portuguese"
    with pytest.raises(ConfigError, match="unknown language code 'xx'.*language's name"):
        TaskPrompt("st", target_lang="xx").validate()
    with pytest.raises(ConfigError, match="needs the target language.*--target-lang"):
        TaskPrompt("st").validate()
    with pytest.raises(ConfigError, match="unknown task 'tts'"):
        TaskPrompt("tts").validate()
    with pytest.raises(ConfigError, match="last chat message must be a user turn"):
        TaskPrompt("chat", messages=[{"role": "user", "content": "<speech>"},
                                     {"role": "assistant", "content": "ok"}]).validate()


def test_sqa_text_question_sits_before_the_speech_slot(blsp_model):
    tok = blsp_model.tokenizer
    prompt = encode_task_prompt(blsp_model.template, tok, TaskPrompt("sqa", question="Who?"))
    before, slot, after = prompt.pieces
    assert slot is None
    assert before == tok("###[Human]:Who?")["input_ids"] and before[0] == tok.bos_token_id
    # the suffix ids are those the LLM sees after text (no SentencePiece dummy-prefix "▁")
    in_context = tok("Who?" + BLSP_SUFFIX, add_special_tokens=False)["input_ids"]
    assert in_context[-len(after):] == after
    assert tok.convert_ids_to_tokens(after)[0] != "▁"
    # a single-turn chat in the BLSP template is the very same prompt
    chat = encode_task_prompt(blsp_model.template, tok, TaskPrompt("chat", question="Who?"))
    assert chat.pieces == prompt.pieces


def test_two_turn_chat_prompts_in_both_templates(blsp_model, chat_model):
    messages = [{"role": "user", "content": "Listen: <speech>"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "<speech> and this?"}]
    tok = chat_model.tokenizer
    prompt = encode_task_prompt(chat_model.template, tok, TaskPrompt("chat", messages=messages))
    assert prompt.num_speech == 2
    assert [None if p is None else tok.decode(p) for p in prompt.pieces] == [
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nListen: ", None,
        "<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n<|im_start|>user\n", None,
        " and this?<|im_end|>\n<|im_start|>assistant\n"]

    tok = blsp_model.tokenizer
    prompt = encode_task_prompt(blsp_model.template, tok, TaskPrompt("chat", messages=messages))
    first, _, middle, _, last = prompt.pieces
    assert first == tok("###[Human]:Listen: ")["input_ids"]
    assert middle[middle.index(tok.eos_token_id) - 1 :][:2] == [
        tok("###[Assistant]:ok", add_special_tokens=False)["input_ids"][-1], tok.eos_token_id]
    assert tok.decode(middle, skip_special_tokens=True).replace(" ", "") == \
        "\n\n\n###[Assistant]:ok###[Human]:".replace(" ", "")
    assert last == tok(" and this?\n\n\n###[Assistant]:", add_special_tokens=False)["input_ids"]


def test_chat_speech_turns_land_in_their_slots(chat_model):
    """The LLM input holds the prompt's token runs in order, with each clip's speech frames
    (as many as the encoder + adapter give) exactly at its slot."""
    messages = [{"role": "user", "content": "<speech>"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "Why? <speech>"}]
    clips = [_wave(0.6, 1), _wave(1.3, 2)]
    generator = SpeechLMGenerator(chat_model, options=GenerationOptions(max_new_tokens=3))
    [result], [inputs] = _captured_inputs(
        chat_model, generator, [Request("c", clips, task="chat", messages=messages)])
    assert result.error is None and result.audio_s == pytest.approx(1.9)
    row_ids = inputs.input_ids[0][inputs.attention_mask[0].bool()].tolist()
    row_speech = inputs.speech_mask[0][inputs.attention_mask[0].bool()].tolist()
    prompt = encode_task_prompt(chat_model.template, chat_model.tokenizer,
                                TaskPrompt("chat", messages=messages))
    expected_ids, expected_speech = [], []
    frames = iter(generator._speech_frames(c.numel()) for c in clips)
    for piece in prompt.pieces:
        n = next(frames) if piece is None else len(piece)
        expected_ids += [chat_model.pad_id] * n if piece is None else piece
        expected_speech += [piece is None] * n
    assert row_speech == expected_speech
    assert [t for t, s in zip(row_ids, row_speech, strict=True) if not s] == \
        [t for t, s in zip(expected_ids, expected_speech, strict=True) if not s]


# -- batching -------------------------------------------------------------------------


def test_batched_greedy_equals_one_at_a_time_for_16_mixed_lengths(blsp_model):
    assert blsp_model.tokenizer.pad_token_id is None  # llama: padding falls back to EOS
    requests = [Request(f"u{i}", _wave(s, i)) for i, s in enumerate(MIXED_SECONDS)]
    options = GenerationOptions(max_new_tokens=8)
    batched = SpeechLMGenerator(blsp_model, batch_size=16, options=options).generate(requests)
    single = SpeechLMGenerator(blsp_model, batch_size=1, options=options).generate(requests)
    assert [r.id for r in batched] == [r.id for r in requests]  # input order restored
    assert [r.text for r in batched] == [r.text for r in single]
    assert [r.n_tokens for r in batched] == [r.n_tokens for r in single]
    assert len({r.text for r in batched}) > 1  # the speech matters, even untrained
    assert all(r.error is None and r.segments == 1 and 0 < r.n_tokens <= 8 for r in batched)
    assert [r.audio_s for r in batched] == pytest.approx(MIXED_SECONDS, abs=1e-4)
    # one batch: everyone waited for the same batch; encode time is shared by duration
    assert len({r.latency_s for r in batched}) == 1
    assert batched[1].encode_s > batched[0].encode_s
    # a duration budget splits the work into more batches with the same outputs
    budget = SpeechLMGenerator(blsp_model, batch_size=16, max_batch_duration=8.0,
                               options=options).generate(requests)
    assert [r.text for r in budget] == [r.text for r in batched]
    assert len({r.latency_s for r in budget}) > 1


def _captured_inputs(model, generator, requests):
    """Results, and the LMInputs of every generate call (via a spy on generate_ids)."""
    calls = []
    original = model.generate_ids

    def spy(inputs, **kwargs):
        calls.append(inputs)
        return original(inputs, **kwargs)

    model.generate_ids = spy
    try:
        return generator.generate(requests), calls
    finally:
        del model.generate_ids


def test_short_and_long_clips_batch_like_single_without_an_encoder_mask(chat_model):
    """HuBERT takes no attention mask, so a padded batch would change a short clip's frames
    (its conv stack's GroupNorm sees the zeros); the generator encodes such clips one by
    one: a 0.2 s clip batched with a 9 s one gets the very speech embeddings it gets alone."""
    assert chat_model.encoder.use_attention_mask is False
    seconds = [0.2, 9.0, 0.5, 4.0]
    requests = [Request(str(i), _wave(s, 10 + i), task="sqa", question="What is said?")
                for i, s in enumerate(seconds)]
    options = GenerationOptions(max_new_tokens=6)
    batched, [inputs] = _captured_inputs(
        chat_model, SpeechLMGenerator(chat_model, options=options), requests)
    single, alone = _captured_inputs(
        chat_model, SpeechLMGenerator(chat_model, batch_size=1, options=options), requests)
    assert [r.text for r in batched] == [r.text for r in single]
    assert all(r.error is None for r in batched)
    by_frames = {int(inputs.speech_mask[row].sum()): inputs.inputs_embeds[row][
        inputs.speech_mask[row]] for row in range(len(requests))}
    assert len(by_frames) == len(requests)
    for one in alone:
        speech = one.inputs_embeds[0][one.speech_mask[0]]
        # equal up to float rounding of batched matmuls (padding effects are O(1))
        torch.testing.assert_close(by_frames[speech.shape[0]], speech, atol=1e-5, rtol=1e-4)


def test_beam_search_and_seeded_sampling(blsp_model):
    requests = [Request(f"u{i}", _wave(s, i)) for i, s in enumerate([0.5, 1.7, 1.1])]
    beam = GenerationOptions(max_new_tokens=6, num_beams=3)
    batched = SpeechLMGenerator(blsp_model, options=beam).generate(requests)
    single = SpeechLMGenerator(blsp_model, batch_size=1, options=beam).generate(requests)
    assert [r.text for r in batched] == [r.text for r in single]
    assert all(r.n_tokens > 0 for r in batched)

    def sample(seed, global_seed):
        torch.manual_seed(global_seed)  # the global RNG must not matter
        options = GenerationOptions(max_new_tokens=8, do_sample=True, temperature=1.5,
                                    top_p=0.95, seed=seed)
        return [r.text for r in SpeechLMGenerator(blsp_model, options=options).generate(requests)]

    first = sample(7, 0)
    assert sample(7, 123) == first
    assert sample(8, 0) != first
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    sample(7, 5)  # seeds its own RNG fork and leaves the caller's stream alone
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        GenerationOptions(do_sample=True, temperature=0)


def test_stop_strings_cut_the_text_and_stop_early(blsp_model):
    requests = [Request("a", _wave(1.2, 3))]
    [free] = SpeechLMGenerator(blsp_model, options=GenerationOptions(max_new_tokens=16)
                               ).generate(requests)
    text = free.text
    # a short alphabetic stop string inside the first half of the text
    stop = next(text[i : i + 2] for i in range(1, len(text) // 2)
                if text[i : i + 2].isalpha() and text[i : i + 2].isascii())
    options = GenerationOptions(max_new_tokens=16, stop=(stop, "never-produced"))
    [cut] = SpeechLMGenerator(blsp_model, options=options).generate(requests)
    assert cut.text == text[: text.find(stop)].strip()
    assert cut.n_tokens < free.n_tokens  # the stopping criterion ended generation early

    assert cut_at_stop_strings("one. two. three", [". t", "two"]) == ("one", True)
    assert cut_at_stop_strings("nothing here", ["###"]) == ("nothing here", False)


# -- long and bad audio -----------------------------------------------------------------


def test_long_asr_audio_is_split_at_silences_and_joined(blsp_model):
    from speechlm.audio.segment import split_on_silence

    wave = _bursts(24.0)
    options = GenerationOptions(max_new_tokens=4)
    generator = SpeechLMGenerator(blsp_model, max_segment_s=8.0, options=options)
    [result] = generator.generate([Request("long", wave)])
    ranges = split_on_silence(wave, SR, max_segment_s=8.0)
    assert result.error is None and result.segments == len(ranges) >= 3
    alone = generator.generate([Request(f"s{i}", wave[a:b]) for i, (a, b) in enumerate(ranges)])
    assert result.text == " ".join(r.text for r in alone if r.text)
    assert result.n_tokens == sum(r.n_tokens for r in alone)


def test_long_sqa_audio_needs_an_encoder_with_windows(tiny_ckpt, blsp_model):
    wave = _bursts(12.0)
    options = GenerationOptions(max_new_tokens=3)
    request = Request("q", wave, task="sqa", question="Who?")
    [refused] = SpeechLMGenerator(blsp_model, max_segment_s=5.0, options=options
                                  ).generate([request])
    assert refused.text == "" and "longer than the limit" in refused.error
    assert "12.0 s > max_segment_s 5" in refused.error
    assert "encoder_max_window_s" in refused.error

    whisper = _build(tiny_ckpt, "whisper", "llama", adapter="stack")  # Whisper: 30 s windows
    [answered] = SpeechLMGenerator(whisper, max_segment_s=5.0, options=options).generate([request])
    assert answered.error is None and answered.segments == 1 and answered.n_tokens > 0


def test_bad_items_are_reported_not_fatal(blsp_model, tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF not really audio")
    generator = SpeechLMGenerator(blsp_model, options=GenerationOptions(max_new_tokens=4))
    results = generator.generate([
        Request("ok", _wave(1.0, 1)),
        Request("tiny", _wave(0.01, 2)),
        Request("missing", str(tmp_path / "nope.wav")),
        Request("corrupt", str(corrupt)),
        Request("nan", torch.full((8000,), float("nan"))),
    ])
    errors = {r.id: r.error for r in results}
    assert errors["ok"] is None and results[0].text
    assert "no speech frames" in errors["tiny"]
    assert "nope.wav: file not found" in errors["missing"]
    assert "corrupt.wav: unreadable or corrupt audio" in errors["corrupt"]
    assert "NaN or Inf" in errors["nan"]

    # a waveform at another rate is resampled to the encoder's 16 kHz
    wave8k = torch.from_numpy(np.interp(np.arange(8000) * 2.0, np.arange(16000),
                                        _wave(1.0, 1).numpy()).astype(np.float32))
    [resampled] = generator.generate([Request("r", wave8k, sample_rate=8000)])
    assert resampled.error is None and resampled.audio_s == pytest.approx(1.0)

    # the LLM's positions: speech + prompt + max_new_tokens must fit
    prompt_tokens = len(generator._encoded_prompt(TaskPrompt("asr")).prompt_ids())
    generator.max_positions = prompt_tokens + 4 + 10  # room for 10 speech positions
    [too_long] = generator.generate([Request("big", _wave(3.0, 4))])
    assert f"exceeds the LLM's {prompt_tokens + 14}" in too_long.error
    assert "--max-new-tokens" in too_long.error
    strict = SpeechLMGenerator(blsp_model, strict=True)
    with pytest.raises(SpeechLMError, match="file not found"):
        strict.generate([Request("missing", str(tmp_path / "nope.wav"))])
    with pytest.raises(ConfigError, match="2 audio clip.*1 speech slot"):
        generator.generate([Request("x", [_wave(1, 1), _wave(1, 2)])])


# -- JSONL and the CLI ------------------------------------------------------------------


def _manifest(tmp_path, n=6):
    audio = tmp_path / "audio"
    audio.mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        path = audio / f"u{i}.wav"
        sf.write(path, _wave(0.4 + 0.3 * i, 20 + i).numpy(), SR)
        lines.append({"id": f"u{i}", "audio": f"audio/u{i}.wav", "text": "x",
                      "question": f"Question {i}?"})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return manifest


class _Killed(Exception):
    pass


def test_jsonl_output_resumes_without_repeating_or_dropping_ids(blsp_model, tmp_path):
    manifest = _manifest(tmp_path)
    prompt = TaskPrompt("sqa")
    requests = requests_from_manifest(manifest, prompt)
    assert [r.question for r in requests] == [f"Question {i}?" for i in range(6)]
    assert requests_from_manifest(manifest, prompt, spoken_question=True)[0].question is None
    options = GenerationOptions(max_new_tokens=4)
    generator = SpeechLMGenerator(blsp_model, batch_size=2, options=options)
    reference = generate_jsonl(generator, requests, tmp_path / "full.jsonl")
    assert reference.items == 6 and reference.failed == 0
    full = [json.loads(line) for line in (tmp_path / "full.jsonl").read_text().splitlines()]

    out = tmp_path / "out.jsonl"
    calls = {"n": 0}
    real_generate = generator.generate

    def dies_on_second_chunk(chunk, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Killed
        return real_generate(chunk, **kwargs)

    generator.generate = dies_on_second_chunk
    with pytest.raises(_Killed):
        generate_jsonl(generator, requests, out, chunk_size=2)
    del generator.generate
    assert len(out.read_text().splitlines()) == 2
    with open(out, "a") as f:
        f.write('{"id": "u2", "te')  # torn by the kill
    again = generate_jsonl(generator, requests + requests[:1], out, chunk_size=2)
    assert again.already_done == 2 and again.items == 4 and again.duplicates == 1
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == [f"u{i}" for i in range(6)]  # each id once
    assert {r["id"]: r["text"] for r in lines} == {r["id"]: r["text"] for r in full}
    assert set(lines[0]) >= {"id", "task", "text", "audio_s", "latency_s", "encode_s",
                             "generate_s", "n_tokens"}
    assert lines[0]["task"] == "sqa" and lines[0]["audio_s"] == pytest.approx(0.4)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "b", "audio": "audio/u0.wav", "messages": "hi"}) + "\n")
    with pytest.raises(ManifestError, match=r"bad.jsonl:1: id 'b': chat messages must be a list"):
        requests_from_manifest(bad, TaskPrompt("chat"))


def _parse(*argv):
    parser = argparse.ArgumentParser()
    add_speech_lm_arguments(parser)
    add_speech_lm_arguments(parser)  # idempotent: shared options are not added twice
    return parser.parse_args([str(a) for a in argv])


def test_cli_runs_a_saved_checkpoint_and_reports_bad_setups(tiny_ckpt, tmp_path, capsys):
    llm_dir = tmp_path / "my-llm"
    shutil.copytree(tiny_ckpt("llama"), llm_dir)
    torch.manual_seed(0)
    model = SpeechLM.build(SpeechLMConfig(encoder_path=str(tiny_ckpt("wav2vec2")),
                                          llm_path=str(llm_dir), adapter="stack"))
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    assert is_speech_lm_dir(ckpt) and not is_speech_lm_dir(llm_dir)
    manifest = _manifest(tmp_path, n=3)
    out = tmp_path / "hyp.jsonl"
    common = ["--model", ckpt, "--max-new-tokens", 4, "--quiet"]
    assert run_speech_lm_inference(_parse(*common, "--task", "st", "--target-lang", "es",
                                          "--manifest", manifest, "--out", out)) == 0
    first = out.read_text()
    assert [json.loads(x)["task"] for x in first.splitlines()] == ["st"] * 3
    assert run_speech_lm_inference(_parse(*common, "--task", "st", "--target-lang", "es",
                                          "--manifest", manifest, "--out", out)) == 0
    assert out.read_text() == first  # resumed: nothing left to do

    wav = tmp_path / "audio" / "u0.wav"
    assert run_speech_lm_inference(_parse(*common, wav, "--stop", "zzz")) == 0
    printed = capsys.readouterr().out.strip()
    assert run_speech_lm_inference(_parse(*common, wav, "--out", tmp_path / "asr.jsonl")) == 0
    assert printed == json.loads((tmp_path / "asr.jsonl").read_text())["text"]

    with pytest.raises(SpeechLMError, match="needs the target language"):
        run_speech_lm_inference(_parse(*common, "--task", "st", wav))
    with pytest.raises(SpeechLMError, match="--manifest needs --out"):
        run_speech_lm_inference(_parse(*common, "--manifest", manifest))
    with pytest.raises(SpeechLMError, match="not a SpeechLM checkpoint"):
        run_speech_lm_inference(_parse("--model", llm_dir, wav))

    # the base LLM moved: the error names it and the override, which then works
    moved = llm_dir.rename(tmp_path / "moved-llm")
    with pytest.raises(ConfigError, match=f"{llm_dir}.*--llm-path NEW_DIR"):
        run_speech_lm_inference(_parse(*common, wav))
    assert run_speech_lm_inference(_parse(*common, wav, "--llm-path", moved, "--out",
                                          tmp_path / "one.jsonl")) == 0
    assert json.loads((tmp_path / "one.jsonl").read_text())["id"] == str(wav)
    # an unreadable file: exit status 1, its name said once with the reason and the fix
    bad = tmp_path / "text.wav"
    bad.write_text("not audio")
    capsys.readouterr()
    assert run_speech_lm_inference(_parse(*common, bad, "--llm-path", moved)) == 1
    err = capsys.readouterr().err
    assert err.count(str(bad)) == 1 and "unreadable or corrupt audio" in err and "re-encode" in err

    # template 'chat' on an LLM without a chat template: a clear error that suggests blsp
    record = json.loads((ckpt / CONFIG_FILE).read_text())
    record["config"]["template"] = "chat"
    (ckpt / CONFIG_FILE).write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="no chat template.*use template 'blsp'"):
        run_speech_lm_inference(_parse(*common, wav, "--llm-path", moved))


def test_chat_template_check_names_the_fix(tiny_ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt("llama"))
    with pytest.raises(ConfigError, match="no chat template.*'blsp'"):
        encode_task_prompt(get_template("chat"), tok, TaskPrompt("chat", question="Hi"))


def test_whisper_speech_lm_takes_long_silent_and_overlong_inputs_item_by_item(tiny_ckpt):
    """With a Whisper encoder: audio past its 30 s window is encoded window by window (all
    of it reaches the LLM, nothing is cut off); a silent clip is reported, not fatal; an
    instruction that leaves no room in the context fails its own item only."""
    whisper = _build(tiny_ckpt, "whisper", "llama", adapter="stack")
    options = GenerationOptions(max_new_tokens=3)
    generator = SpeechLMGenerator(whisper, max_segment_s=None, options=options)
    long = _bursts(45.0)
    assert generator._speech_frames(long.numel()) == whisper.adapter.output_lengths(
        torch.tensor([2250])).item()  # 45 s at 50 Hz: both windows, then the adapter
    generator.max_positions = 600
    results = generator.generate([
        Request("long", long, task="sqa", question="Who?"),
        Request("silent", torch.zeros(SR), task="sqa", question="Who?"),
        Request("wordy", _wave(1.0, 3), task="sqa", question="Who? " * 400),
        Request("ok", _wave(1.0, 4), task="sqa", question="Who?"),
    ])
    by_id = {r.id: r for r in results}
    assert by_id["long"].error is None and by_id["long"].audio_s == pytest.approx(45.0)
    assert by_id["ok"].error is None and by_id["ok"].n_tokens > 0
    assert "prompt too long" in by_id["wordy"].error and "shorten the instruction" in \
        by_id["wordy"].error
    silent = by_id["silent"]
    assert silent.text == "" and "audio is silent" in silent.error
