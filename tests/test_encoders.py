"""Speech encoders: exact frame counts, agreement with transformers' own pipeline,
padding (in)variance, long-audio windows, layer choice and freezing."""

import math
import shutil

import numpy as np
import pytest
import torch

from speechlm.errors import AudioTooShortError, ConfigError
from speechlm.models.encoders import SSLEncoder, WhisperSpeechEncoder, load_encoder


@pytest.fixture(scope="module")
def encoders(tiny_ckpt):
    cache = {}

    def get(kind, **options):
        key = (kind, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = load_encoder("auto", tiny_ckpt(kind), **options)
        return cache[key]

    return get


def _audio(seconds, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(int(seconds * 16000), generator=gen) * 0.1


def test_auto_detection_and_interface(encoders):
    w2v, hubert, whisper = encoders("wav2vec2"), encoders("hubert"), encoders("whisper")
    assert isinstance(w2v, SSLEncoder) and w2v.kind == "wav2vec2" and w2v.use_attention_mask
    assert isinstance(hubert, SSLEncoder) and hubert.kind == "hubert"
    assert not hubert.use_attention_mask  # group-norm conv stack: trained without a mask
    assert isinstance(whisper, WhisperSpeechEncoder)
    assert (w2v.output_dim, whisper.output_dim) == (32, 64)
    assert w2v.frame_rate == whisper.frame_rate == 50.0 and w2v.sample_rate == 16000


@pytest.mark.parametrize("kind,one_second", [("wav2vec2", 49), ("hubert", 49), ("whisper", 50)])
def test_exact_output_lengths(encoders, kind, one_second):
    enc = encoders(kind)
    samples = [16000, 8000, 4321, 400]
    audio = torch.stack([torch.nn.functional.pad(_audio(n / 16000, i), (0, 16000 - n))
                         for i, n in enumerate(samples)])
    with torch.no_grad():
        out = enc(audio, torch.tensor(samples))
    if kind == "whisper":  # ceil(mel_frames / 2), mel_frames = ceil(samples / 160)
        expected = [math.ceil(math.ceil(n / 160) / 2) for n in samples]
    else:  # the conv stack: kernels (10,3,3,3,3,2,2), strides (5,2,2,2,2,2,2)
        expected = []
        for n in samples:
            for k, s in zip((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2), strict=True):
                n = (n - k) // s + 1
            expected.append(n)
    assert expected[0] == one_second
    assert out.lengths.tolist() == expected == enc.output_lengths(torch.tensor(samples)).tolist()
    assert out.hidden.shape == (4, one_second, enc.output_dim)
    for row, n in enumerate(expected):
        assert torch.all(out.hidden[row, n:] == 0) and out.hidden[row, n - 1].abs().sum() > 0


def test_whisper_matches_transformers_feature_extractor_and_encoder(encoders, tiny_ckpt):
    """With pad_to_window the clip runs through transformers' own 30 s path."""
    from transformers import WhisperFeatureExtractor, WhisperModel

    path = tiny_ckpt("whisper")
    wave = _audio(1.3, seed=3)
    features = WhisperFeatureExtractor.from_pretrained(path)(
        wave.numpy(), sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        ref = WhisperModel.from_pretrained(path).encoder(features).last_hidden_state
        out = encoders("whisper", pad_to_window=True)(wave[None], torch.tensor([wave.numel()]))
        own = encoders("whisper")(wave[None], torch.tensor([wave.numel()]))
    assert out.lengths.tolist() == own.lengths.tolist() == [65]  # 1.3 s -> 130 mel frames -> 65
    torch.testing.assert_close(out.hidden[0], ref[0, :65], atol=2e-4, rtol=1e-4)
    # the clip at its own length sees no 28.7 s of silence: close to, not equal to, the window
    assert not torch.allclose(own.hidden, out.hidden, atol=1e-3)
    assert (own.hidden - out.hidden).abs().mean() < 0.2 * out.hidden.abs().mean()


def test_whisper_own_length_path_is_the_encoder_on_a_full_window(tiny_ckpt):
    """On exactly 30 s nothing is cut or masked: every hidden state equals transformers'."""
    from speechlm.audio.features import log_mel_spectrogram

    enc = load_encoder("auto", tiny_ckpt("whisper"))
    mel = log_mel_spectrogram(_audio(30.0, seed=11)[None], 80)
    with torch.no_grad():
        ref = enc.backbone(mel, output_hidden_states=True).hidden_states
        ours = enc._encode_unpadded(mel, torch.tensor([3000]), all_layers=True)
    assert len(ours) == len(ref) == enc.num_hidden_states
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_wav2vec2_matches_transformers_pipeline_and_loads_a_ctc_dir(encoders, tiny_ckpt, tmp_path):
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2Model

    path = tiny_ckpt("wav2vec2")
    waves = [_audio(1.0, 1).numpy(), _audio(0.6, 2).numpy()]
    fe = Wav2Vec2FeatureExtractor.from_pretrained(path)
    batch = fe(waves, sampling_rate=16000, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = Wav2Vec2Model.from_pretrained(path)(batch.input_values,
                                                  attention_mask=batch.attention_mask)
    enc = encoders("wav2vec2")
    audio = torch.zeros(2, 16000)
    audio[0], audio[1, :9600] = torch.from_numpy(waves[0]), torch.from_numpy(waves[1])
    with torch.no_grad():
        out = enc(audio, torch.tensor([16000, 9600]))
    torch.testing.assert_close(out.hidden[0], ref.last_hidden_state[0], atol=1e-4, rtol=1e-4)
    n = int(out.lengths[1])
    torch.testing.assert_close(out.hidden[1, :n], ref.last_hidden_state[1, :n], atol=1e-4, rtol=1e-4)

    # a trained CTC model is a normal Wav2Vec2ForCTC dir: the encoder takes its base model
    ctc_dir = tmp_path / "ctc"
    Wav2Vec2ForCTC.from_pretrained(path, vocab_size=12).save_pretrained(ctc_dir)
    shutil.copy(path / "preprocessor_config.json", ctc_dir)
    from_ctc = load_encoder("wav2vec2", ctc_dir)
    with torch.no_grad():
        torch.testing.assert_close(from_ctc(audio, torch.tensor([16000, 9600])).hidden, out.hidden)


@pytest.mark.parametrize("kind,options", [("wav2vec2", {}), ("whisper", {}),
                                          ("whisper", {"pad_to_window": True})])
def test_batch_padding_does_not_change_an_items_frames(encoders, kind, options):
    """wav2vec2 with a layer-norm stack and Whisper at each clip's own length mask the
    batch's padding; Whisper on 30 s windows pads every item anyway: either way an item's
    frames are the same alone or in a batch."""
    enc = encoders(kind, **options)
    short, long = _audio(0.5, 4), _audio(1.5, 5)
    audio = torch.stack([torch.nn.functional.pad(short, (0, long.numel() - short.numel())), long])
    with torch.no_grad():
        alone = enc(short[None], torch.tensor([short.numel()]))
        together = enc(audio, torch.tensor([short.numel(), long.numel()]))
    n = int(alone.lengths[0])
    torch.testing.assert_close(together.hidden[0, :n], alone.hidden[0], atol=1e-4, rtol=1e-4)


def test_hubert_sees_padding_unless_unpadded(encoders):
    """HuBERT takes no attention mask (as in its training), so its group-norm conv stack and
    attention see a batch's zero padding: a short item's frames change with the batch. The
    lengths stay exact; `unpadded=True` runs items alone and restores exact invariance."""
    short, long = _audio(0.5, 6), _audio(1.5, 7)
    audio = torch.stack([torch.nn.functional.pad(short, (0, long.numel() - short.numel())), long])
    lengths = torch.tensor([short.numel(), long.numel()])
    for unpadded, invariant in ((False, False), (True, True)):
        enc = encoders("hubert", unpadded=unpadded)
        with torch.no_grad():
            alone = enc(short[None], lengths[:1])
            together = enc(audio, lengths)
        n = int(alone.lengths[0])
        assert together.lengths.tolist() == [n, 74]
        same = torch.allclose(together.hidden[0, :n], alone.hidden[0], atol=1e-4, rtol=1e-4)
        assert same is invariant


@pytest.mark.parametrize("pad_to_window", [False, True])
def test_whisper_long_audio_runs_in_30s_windows(encoders, pad_to_window):
    enc = encoders("whisper", pad_to_window=pad_to_window)
    wave = _audio(31.0, 8)
    with torch.no_grad():
        out = enc(wave[None], torch.tensor([wave.numel()]))
        first = enc(wave[None, :480000], torch.tensor([480000]))
        tail = enc(wave[None, 480000:], torch.tensor([16000]))
    assert out.lengths.tolist() == [1550] == enc.output_lengths(torch.tensor([496000])).tolist()
    torch.testing.assert_close(out.hidden[0, :1500], first.hidden[0])
    torch.testing.assert_close(out.hidden[0, 1500:], tail.hidden[0])


def test_ssl_max_window_splits_long_audio(tiny_ckpt):
    enc = load_encoder("wav2vec2", tiny_ckpt("wav2vec2"), max_window_s=1.0)
    wave = _audio(2.5, 9)
    with torch.no_grad():
        out = enc(torch.stack([wave, torch.zeros_like(wave)]), torch.tensor([40000, 12000]))
        parts = [enc(wave[None, s : s + 16000], torch.tensor([min(16000, 40000 - s)])).hidden[0]
                 for s in (0, 16000, 32000)]
    assert out.lengths.tolist() == [49 + 49 + 24, 37]
    assert out.lengths.tolist() == enc.output_lengths(torch.tensor([40000, 12000])).tolist()
    torch.testing.assert_close(out.hidden[0, :122], torch.cat(parts), atol=1e-4, rtol=1e-4)


def test_layer_selection_and_weighted_sum(tiny_ckpt):
    from transformers import Wav2Vec2Model

    from speechlm.audio.features import normalize_waveform

    path = tiny_ckpt("wav2vec2")
    wave = _audio(0.8, 10)[None]
    n = torch.tensor([wave.shape[1]])
    with torch.no_grad():
        states = Wav2Vec2Model.from_pretrained(path)(
            normalize_waveform(wave), attention_mask=torch.ones_like(wave, dtype=torch.long),
            output_hidden_states=True).hidden_states
        layer1 = load_encoder("auto", path, layer=1)(wave, n).hidden
        weighted = load_encoder("auto", path, layer="weighted")(wave, n).hidden
    torch.testing.assert_close(layer1[0], states[1][0], atol=1e-5, rtol=1e-5)
    # zero-initialised weights: a uniform average of all hidden states
    torch.testing.assert_close(weighted[0], torch.stack(states).mean(0)[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="layer 7 is out of range.*3 hidden states"):
        load_encoder("auto", path, layer=7)
    with pytest.raises(ConfigError, match="'last' or 'weighted'"):
        load_encoder("auto", path, layer="middle")


def test_frozen_backbone_gets_no_grad_and_stays_in_eval_while_weights_train(tiny_ckpt):
    enc = load_encoder("auto", tiny_ckpt("whisper"), layer="weighted")
    parent = torch.nn.Sequential(enc).train()
    assert enc.training and not enc.backbone.training  # frozen: no dropout in the backbone
    assert [n for n, p in enc.named_parameters() if p.requires_grad] == ["layer_weights"]
    optimizer = torch.optim.SGD([enc.layer_weights], lr=1.0)
    wave = _audio(0.5, 11)[None]
    out = enc(wave, torch.tensor([8000]))
    (out.hidden[0, :, 0]).sum().backward()
    assert all(p.grad is None for p in enc.backbone.parameters())
    assert enc.layer_weights.grad.abs().sum() > 0
    before = enc.layer_weights.detach().clone()
    optimizer.step()
    assert not torch.equal(before, enc.layer_weights.detach())

    enc.set_frozen(False)
    parent.train()
    assert enc.backbone.training and all(p.requires_grad for p in enc.backbone.parameters())


def test_bad_inputs_are_reported(tiny_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="directory not found: .*nowhere"):
        load_encoder("auto", tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="does not fit .*model_type 'whisper'"):
        load_encoder("hubert", tiny_ckpt("whisper"))
    with pytest.raises(ConfigError, match="model_type 'llama' is not a supported speech encoder"):
        load_encoder("auto", tiny_ckpt("llama"))
    enc = load_encoder("auto", tiny_ckpt("wav2vec2"))
    with pytest.raises(AudioTooShortError, match="no wav2vec2 frames"):
        enc(torch.zeros(1, 300), torch.tensor([300]))
    out = enc(np.zeros((0, 100), dtype=np.float32), torch.zeros(0, dtype=torch.long))
    assert out.hidden.shape == (0, 0, 32)
