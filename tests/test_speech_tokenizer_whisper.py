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
              if k not in ("head", "language", "repeat_units", "position_mean")}
    digest = hashlib.sha256(json.dumps(legacy, sort_keys=True).encode())
    digest.update(Saved.vq.codebook.numpy().tobytes())
    assert SpeechTokenizer.identity.fget(Saved()) == digest.hexdigest()[:16]
    Saved.settings = TokenizerSettings(vq_layer=2, head="whisper_decoder")
    assert SpeechTokenizer.identity.fget(Saved()) != digest.hexdigest()[:16]


def test_position_means_are_fitted_removed_before_the_vq_and_added_back(tiny_ckpt, tmp_path):
    """position_mean: fit_codebook puts the mean pooled state of each unit position in a
    buffer and k-means the rest; units are the nearest codes of (state - mean) and decode to
    (code + mean); the means are saved, reload and enter the identity."""
    from speechlm.models.speech_tokenizer import (
        SpeechTokenizer,
        TokenizerSettings,
        load_speech_tokenizer,
        save_speech_tokenizer,
    )
    from speechlm.models.vq import nearest_codes

    init = tiny_ckpt("whisper", init_std=INIT_STD)
    torch.manual_seed(0)
    tok = SpeechTokenizer.build(init, None, TokenizerSettings(
        vq_layer=1, num_codes=8, head="whisper_decoder", language="es", repeat_units=True,
        position_mean=True)).eval()
    audio = [torch.randn(3, 16000) * 0.1, torch.randn(2, 12000) * 0.1]
    lengths = [torch.tensor([16000, 12000, 8000]), torch.tensor([12000, 6400])]
    info = tok.fit_codebook(zip(audio, lengths, strict=True), shrink=0.0)
    assert info["frames"] == 13 + 10 + 7 + 10 + 5 and bool(tok.vq.initialized)

    with torch.no_grad():
        pooled = []
        for a, n in zip(audio, lengths, strict=True):
            out = tok.pool(*tok._lower(a, n))
            pooled += [row[:k] for row, k in zip(out.hidden, out.lengths.tolist(), strict=True)]
    assert torch.allclose(tok.position_mean[0], torch.stack([p[0] for p in pooled]).mean(0),
                          atol=1e-5)
    assert torch.allclose(tok.position_mean[12], pooled[0][12], atol=1e-5)  # one item reaches
    overall = torch.cat(pooled).mean(0)
    assert torch.allclose(tok.position_mean[13:], overall.expand(len(tok.position_mean) - 13, -1),
                          atol=1e-5)  # no utterance that long: the overall mean

    units = tok.encode(audio[0], lengths[0])
    centred = pooled[0] - tok.position_mean[:13]
    assert units[0] == nearest_codes(centred, tok.vq.codebook).tolist()
    vectors, _ = tok._units_to_vectors([units[0]])
    assert torch.allclose(vectors[0], tok.vq.codebook[units[0]] + tok.position_mean[:13])

    save_speech_tokenizer(tok, tmp_path / "tok")
    again = load_speech_tokenizer(tmp_path / "tok")
    assert torch.equal(again.position_mean, tok.position_mean)
    assert again.identity == tok.identity and again.encode(audio[0], lengths[0]) == units
    with torch.no_grad():
        again.position_mean[0] += 1.0
    assert again.identity != tok.identity  # other means: units not comparable


def test_vq_reports_restarts_and_a_threshold_above_a_codes_share_restarts_most_codes():
    """The default threshold (1 frame per batch) with fewer frames per batch than codes
    counts most codes dead at every update; the count is reported so a run shows it."""
    from speechlm.models.vq import VectorQuantizer

    torch.manual_seed(0)
    frames = torch.randn(4, 25, 6)  # 100 frames per batch, 256 codes: 0.39 a code
    churn = VectorQuantizer(256, 6, dead_code_threshold=1.0).train()
    calm = VectorQuantizer(256, 6, dead_code_threshold=0.01).train()
    churn(frames), calm(frames)  # the k-means starts
    churned = [churn(torch.randn(4, 25, 6)).restarted for _ in range(5)]
    calmed = [calm(torch.randn(4, 25, 6)).restarted for _ in range(5)]
    assert min(churned) > 128, churned  # over half the codebook every update
    # a low threshold restarts the codes the k-means start left empty, fewer every update
    assert calmed == sorted(calmed, reverse=True) and calmed[-1] < min(churned) / 2, calmed


def test_position_mean_needs_the_kmeans_start(tmp_path, corpus, tiny_ckpt):
    init = tiny_ckpt("whisper", init_std=INIT_STD)
    path = _recipe(tmp_path, corpus, init, out=tmp_path / "bad", model="  position_mean: true\n")
    with pytest.raises(ConfigError, match="model.position_mean needs model.kmeans_items"):
        run_recipe(path)


def test_kmeans_start_on_many_utterances_with_position_means_trains(tmp_path, corpus,
                                                                      tiny_ckpt):
    from speechlm.models.speech_tokenizer import load_speech_tokenizer

    init = tiny_ckpt("whisper", init_std=INIT_STD)
    out = tmp_path / "fitted"
    run_recipe(_recipe(tmp_path, corpus, init, out=out, steps=4,
                       model="  kmeans_items: 50\n  position_mean: true\n"))
    tokenizer = load_speech_tokenizer(out / "final")
    assert tokenizer.settings.position_mean  # fitted before the first update:
    assert tokenizer.position_mean.abs().sum() > 0
    assert train_losses(out)[-1] < train_losses(out)[0]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("code_restarts" in r for r in rows if r.get("split") == "train")


def test_shipped_recipe_validates():
    from pathlib import Path

    from speechlm.recipes import load_recipe

    root = Path(__file__).resolve().parents[1]
    module, config = load_recipe(root / "recipes/tokenizer/whisper_base_12hz.yaml")
    settings = config.model.settings()
    assert module.__name__.endswith("speech_tokenizer_whisper")
    assert settings.head == "whisper_decoder" and settings.frame_rate == 12.5
    assert settings.vq_layer == 3 and config.model.language == "en"


def test_zoo_tokenizer_is_the_shipped_recipe():
    """speech_tokenizer_whisper_en copies the recipe (recipes/ is not in the package): the
    two may differ only in the baseline rows and the output directory."""
    from pathlib import Path

    from speechlm import zoo
    from speechlm.recipes import load_recipe

    root = Path(__file__).resolve().parents[1]
    _, shipped = load_recipe(root / "recipes/tokenizer/whisper_base_12hz.yaml")
    _, member = load_recipe(zoo.recipe_path("speech_tokenizer_whisper_en"))
    assert member.model == shipped.model and member.data == shipped.data
    assert dataclasses.replace(member.train, output_dir=shipped.train.output_dir) == shipped.train
    assert dataclasses.replace(member.eval, baseline=True) == shipped.eval
