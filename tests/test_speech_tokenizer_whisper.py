"""`task: speech_tokenizer_whisper` (GLM-4-Voice's tokenizer trained through Whisper's own
decoder) on the tiny random Whisper and eSpeak Spanish: the loss falls, the frozen layers
below the VQ stay as pretrained (and train when unfrozen), the saved tokenizer reloads with
its identity and turns units alone into text through the decoder, and bad settings are
refused with the field and the fix."""

import dataclasses
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from speechlm.errors import ConfigError
from speechlm.testing.runs import run_recipe, train_losses, whisper_decoder_sections

INIT_STD = 0.3  # as tests/test_whisper_lora.py: a tiny decoder whose logits can move

@pytest.fixture
def corpus(es_speech_corpus):
    return es_speech_corpus


def _recipe(tmp_path, corpus, init, *, out, steps=8, model="", data=""):
    text = f"""\
task: speech_tokenizer_whisper
model:
  init: "{init}"
  language: es
  vq_layer: 1
  num_codes: 16
{model}""" + whisper_decoder_sections(corpus, tmp_path / "cache", out, steps=steps,
                                        every=steps, data=data)
    path = tmp_path / f"recipe-{out.name}.yaml"
    path.write_text(text)
    return path


def _pretrained(init) -> dict:
    state = {}
    for file in sorted(init.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def test_trains_through_the_decoder_and_the_saved_tokenizer_reads_units(tmp_path, corpus,
                                                                          tiny_ckpt):
    from speechlm.models.speech_tokenizer import load_speech_tokenizer

    init = tiny_ckpt("whisper", init_std=INIT_STD)
    out = tmp_path / "run"
    results = run_recipe(_recipe(tmp_path, corpus, init, out=out, model="  freeze_lower: true\n"))
    losses = train_losses(out)
    assert len(losses) == 8 and losses[-1] < 0.7 * losses[0], losses
    assert any((tmp_path / "cache").rglob("index-r0.jsonl"))  # trained from the cache

    tokenizer = load_speech_tokenizer(out / "final")
    assert tokenizer.identity == results["identity"]
    pretrained = _pretrained(init)
    state = tokenizer.state_dict()
    for key in ("conv1.weight", "layers.0.fc1.weight"):  # below the VQ: never trained
        assert torch.equal(state[f"encoder.{key}"], pretrained[f"model.encoder.{key}"].float())
    for key in ("layers.1.fc1.weight",):  # above it: trained
        assert not torch.equal(state[f"encoder.{key}"], pretrained[f"model.encoder.{key}"])
    assert torch.equal(state["whisper.model.decoder.embed_tokens.weight"],  # frozen table
                       pretrained["model.decoder.embed_tokens.weight"].float())

    test = results["test"]
    assert test["utterances"] == 2 and 0 <= test["cer"]
    assert 9.0 < test["units_per_second"] <= 12.5 + 1.0  # 12.5 Hz, the last unit rounded up
    assert results["test_baseline"]["utterances"] == 2
    rows = [json.loads(line) for line in (out / "test_hyps.jsonl").read_text().splitlines()]
    assert [r["ref"] for r in rows] == ["un gato", "dos perros"]
    assert all(r["units"] > 0 for r in rows)
    # the units alone decode to the same text as the audio's own path
    units = [[0, 1, 2, 3]] * 2
    assert tokenizer.transcribe_units(units, max_new_tokens=4) == \
        tokenizer.transcribe_units(units[:1], max_new_tokens=4) * 2


def test_unfrozen_lower_layers_train_on_the_audio_at_12hz(tmp_path, corpus, tiny_ckpt):
    """The paper's way: the layers below the VQ train (no cache) and, as in the release, the
    layers above run at 12.5 Hz on 375 positions."""
    from speechlm.models.speech_tokenizer import load_speech_tokenizer

    init = tiny_ckpt("whisper", init_std=INIT_STD)
    out = tmp_path / "unfrozen"
    run_recipe(_recipe(tmp_path, corpus, init, out=out, steps=4,
                       model="  freeze_lower: false\n  repeat_units: false\n"))
    assert not (tmp_path / "cache").exists()  # nothing to cache: those layers change
    tokenizer = load_speech_tokenizer(out / "final")
    state = tokenizer.state_dict()
    pretrained = _pretrained(init)
    assert not torch.equal(state["encoder.layers.0.fc1.weight"],
                           pretrained["model.encoder.layers.0.fc1.weight"])
    states = tokenizer._decoder_states(tokenizer.vq.decode([[1, 2, 3]]), torch.tensor([3]))
    assert states.shape[1] == 375


def test_silence_frames_are_what_the_lower_layers_give_a_silent_window(tiny_ckpt, tmp_path):
    """repeat_units: after the speech's units (4 frames each) the decoder's window holds the
    lower layers' output for padding-level log-mel, which is saved with the weights."""
    import torch.nn.functional as F

    from speechlm.models.speech_tokenizer import (
        SILENCE_MEL,
        SpeechTokenizer,
        TokenizerSettings,
        load_speech_tokenizer,
        save_speech_tokenizer,
    )

    init = tiny_ckpt("whisper", init_std=INIT_STD)
    tok = SpeechTokenizer.build(init, None, TokenizerSettings(
        vq_layer=1, num_codes=8, head="whisper_decoder", language="es",
        repeat_units=True)).eval()
    enc = tok.encoder
    with torch.no_grad():
        x = F.gelu(enc.conv2(F.gelu(enc.conv1(torch.full((1, 80, 3000), SILENCE_MEL)))))
        x = enc.layers[0](x.transpose(1, 2) + enc.embed_positions.weight[:1500], None)
        x = x[0] if isinstance(x, tuple) else x
    assert torch.allclose(tok.silence, x[0], atol=1e-5)
    assert tok.silence.std() > 0  # frames differ by position, as Whisper's padded tail does
    assert not hasattr(tok, "pad_unit")  # no parameter left without a gradient (DDP)

    with torch.no_grad():
        tok.vq.codebook.normal_()
        full = tok._decoder_states(tok.vq.decode([[1, 2, 3]]), torch.tensor([3]))
        shorter = tok._decoder_states(tok.vq.decode([[1, 2]]), torch.tensor([2]))
    assert full.shape == (1, 1500, enc.config.d_model)
    assert not torch.allclose(full, shorter)  # the third unit's 4 frames, then silence

    save_speech_tokenizer(tok, tmp_path / "tok")
    again = load_speech_tokenizer(tmp_path / "tok")
    assert torch.equal(again.silence, tok.silence)
    with torch.no_grad():
        assert torch.allclose(again._decoder_states(again.vq.decode([[1, 2, 3]]),
                                                    torch.tensor([3])), full, atol=1e-5)


@pytest.mark.parametrize("model, message", [
    ("  language: xx\n", "model.language='xx' is not one of"),
    ("  vq_layer: 2\n", "vq_layer=2: the encoder has 2 layers"),
    ("  head: ctc\n", "head"),
])
def test_bad_settings_are_refused_with_the_field(tmp_path, corpus, tiny_ckpt, model, message):
    init = tiny_ckpt("whisper", init_std=INIT_STD)
    path = _recipe(tmp_path, corpus, init, out=tmp_path / "bad")
    text = path.read_text()
    for line in model.splitlines():  # replace the recipe's own line for that key
        key = line.split(":")[0]
        text = "\n".join(existing for existing in text.splitlines()
                         if existing.split(":")[0] != key) + "\n"
        text = text.replace("model:\n", f"model:\n{line}\n", 1)
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        run_recipe(path)


def test_scratch_init_is_refused(tmp_path):
    from speechlm.models.speech_tokenizer import SpeechTokenizer, TokenizerSettings

    with pytest.raises(ConfigError, match="not scratch"):
        SpeechTokenizer.build("scratch", None, TokenizerSettings(vq_layer=1,
                                                                 head="whisper_decoder"))


def test_ctc_tokenizer_identity_unchanged_by_the_new_settings():
    """Tokenizers saved before `head` existed keep their identity (unit files name it): for
    head ctc the hash leaves the new fields out."""
    from speechlm.models.speech_tokenizer import SpeechTokenizer, TokenizerSettings

    class Saved:  # what `identity` reads: the settings and the codebook
        settings = TokenizerSettings(vq_layer=2)
        vq = type("VQ", (), {"codebook": torch.arange(4.0).reshape(2, 2)})()

    legacy = {k: v for k, v in dataclasses.asdict(Saved.settings).items()
              if k not in ("head", "language", "repeat_units")}
    digest = hashlib.sha256(json.dumps(legacy, sort_keys=True).encode())
    digest.update(Saved.vq.codebook.numpy().tobytes())
    assert SpeechTokenizer.identity.fget(Saved()) == digest.hexdigest()[:16]
    Saved.settings = TokenizerSettings(vq_layer=2, head="whisper_decoder")
    assert SpeechTokenizer.identity.fget(Saved()) != digest.hexdigest()[:16]


def test_shipped_recipe_validates():
    from pathlib import Path

    from speechlm.recipes import load_recipe

    root = Path(__file__).resolve().parents[1]
    module, config = load_recipe(root / "recipes/tokenizer/whisper_base_12hz.yaml")
    settings = config.model.settings()
    assert module.__name__.endswith("speech_tokenizer_whisper")
    assert settings.head == "whisper_decoder" and settings.frame_rate == 12.5
    assert settings.vq_layer == 3 and config.model.language == "en"
