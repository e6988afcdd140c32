"""Benchmark: Whisper as a frozen encoder and as the cascade ASR, on real weights.

Model: `models:whisper-base` (assembled from its registry package; the
benchmark is skipped with a message when the package is not installed), or
SPEECHLM_BENCH_WHISPER=NAME_OR_DIR. Audio: the first 64 utterances of the
embedded corpus's test split (held-out eSpeak voices, 1-13 s; built on first
use), in order.

Rows:
1. encoding speed: `WhisperSpeechEncoder` on each clip's own length (the
   default) vs padded 30 s windows (transformers' own path), the same 64 clips
   in batches of 8 sorted by duration: audio seconds per wall second;
2. what the shortcut changes: the mean relative difference of the encoder
   outputs (own length vs the same frames of the padded window), and ASR
   through Whisper's own decoder (one clip at a time, greedy) fed the whole
   30 s window's output (as Whisper runs), only its first frames (the clip's
   length), or the own-length output. Whisper's decoder was trained on whole
   windows, so the cut rows say what its decoder makes of a clip without the
   silent tail, and the own-length row what the shortcut changes beyond that;
3. cascade ASR throughput: `WhisperTranscriber` in batches of 16 vs one clip at
   a time (utterances per second; the texts must be identical).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

N_CLIPS = 64


def _clips(n: int):
    from speechlm.audio.io import load_audio
    from speechlm.data.manifest import AUDIO_PATH_KEY, read_manifest
    from speechlm.recipes.sources import resolve_manifest

    records = list(read_manifest(resolve_manifest("embedded:en/test")))[:n]
    return records, [load_audio(r[AUDIO_PATH_KEY], 16000) for r in records]


def _encode_all(encoder, waves, batch: int):
    import torch

    order = sorted(range(len(waves)), key=lambda i: waves[i].numel())
    out = [None] * len(waves)
    start = time.perf_counter()
    with torch.inference_mode():
        for g in range(0, len(order), batch):
            idx = order[g : g + batch]
            enc = encoder([waves[i] for i in idx])
            for row, i in enumerate(idx):
                out[i] = enc.hidden[row, : int(enc.lengths[row])].clone()
    return out, time.perf_counter() - start


def _decode_from(model, tokenizer, hidden) -> str:
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    with torch.inference_mode():
        ids = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=hidden[None]),
                             max_new_tokens=200, num_beams=1, do_sample=False,
                             return_timestamps=False,
                             **({"language": "en", "task": "transcribe"}
                                if model.generation_config.is_multilingual else {}))
    return " ".join(tokenizer.decode(ids[0], skip_special_tokens=True).split())


def run(quick: bool = False) -> list[dict]:
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperTokenizerFast

    from speechlm.audio.features import log_mel_spectrogram
    from speechlm.errors import ConfigError
    from speechlm.eval.metrics import cer, wer
    from speechlm.inference.whisper_asr import WhisperTranscriber
    from speechlm.models.encoders import load_encoder
    from speechlm.pretrained.resolve import resolve_model_dir

    name = os.environ.get("SPEECHLM_BENCH_WHISPER", "models:whisper-base")
    try:
        model_dir = resolve_model_dir(name, say=lambda m: print(m, file=sys.stderr))
    except ConfigError as e:
        print(f"whisper_encoding: skipped ({e})", file=sys.stderr)
        return []
    n = 16 if quick else N_CLIPS
    records, waves = _clips(n)
    audio_s = sum(w.numel() for w in waves) / 16000
    refs = [r["text"] for r in records]
    rows = []

    own = load_encoder("whisper", model_dir)
    padded = load_encoder("whisper", model_dir, pad_to_window=True)
    own_out, own_s = _encode_all(own, waves, 8)
    pad_out, pad_s = _encode_all(padded, waves, 8)
    rows.append({"benchmark": f"Whisper encoder ({Path(model_dir).name}), {n} test clips "
                              f"({audio_s:.0f} s), batches of 8",
                 "metric": "audio s per wall s: own length vs 30 s windows",
                 "value": audio_s / own_s, "baseline": audio_s / pad_s,
                 "ratio": pad_s / own_s})
    rel = torch.stack([(a - b).norm() / b.norm() for a, b in zip(own_out, pad_out, strict=True)])
    rows.append({"benchmark": "Whisper encoder, same clips",
                 "metric": "relative difference of the outputs, own length vs 30 s (mean, max)",
                 "value": float(rel.mean()), "baseline": None, "ratio": None,
                 "note": f"max {float(rel.max()):.3f}"})

    model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = WhisperTokenizerFast.from_pretrained(model_dir)
    with torch.inference_mode():  # the whole window's output, as Whisper itself runs
        whole = [model.model.encoder(log_mel_spectrogram(w[None], padded.n_mels)
                                     ).last_hidden_state[0] for w in waves]
    scores = {}
    for name, outputs in (("whole", whole), ("cut", pad_out), ("own", own_out)):
        hyps = [_decode_from(model, tokenizer, h) for h in outputs]
        scores[name] = f"{100 * wer(refs, hyps, lang='en'):.1f} / {100 * cer(refs, hyps, lang='en'):.1f}"
    rows.append({"benchmark": "Whisper's decoder on the encoder outputs, same clips",
                 "metric": "WER / CER: own length vs the whole 30 s window",
                 "value": scores["own"], "baseline": scores["whole"], "ratio": None,
                 "note": f"the window's output cut to the clip: {scores['cut']}"})

    transcriber = WhisperTranscriber(model_dir, device="cpu")
    start = time.perf_counter()
    batched, _ = transcriber.transcribe_waves(waves)
    batched_s = time.perf_counter() - start
    transcriber.max_batch_size = 1
    start = time.perf_counter()
    single, _ = transcriber.transcribe_waves(waves)
    single_s = time.perf_counter() - start
    same = sum(a == b for a, b in zip(batched, single, strict=True))
    rows.append({"benchmark": "Whisper cascade ASR (`speechlm infer`), same clips",
                 "metric": "utterances per s: batches of 16 vs one at a time",
                 "value": n / batched_s, "baseline": n / single_s, "ratio": single_s / batched_s,
                 "note": f"{same}/{n} texts identical; WER {100 * wer(refs, batched, lang='en'):.1f}"})
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
