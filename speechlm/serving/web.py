"""The web demo: a Gradio page to record or upload audio, type an instruction and read
the answer, with clips of the embedded corpus one click away.

It is mounted on the API server (`/web`) and asks the model through the same
batcher as the API, so people on the page and programs share the batches.
Example clips are test-split verses of the embedded corpus: the built corpus's
files when the cache has it, else the same verses spoken now by eSpeak NG
(voice, rate and pitch of the corpus recipe) into the server's temporary
directory.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

N_EXAMPLES = 3

# (path of the clip Gradio received, instruction) -> answer text (or an error message)
AskFn = Callable[[str, str], Awaitable[str]]


def example_clips(out_dir: Path, n: int = N_EXAMPLES) -> list[tuple[str, str]]:
    """[(audio path, transcript)] of the first n test clips of the embedded English corpus."""
    from ..pipelines.embedded_corpus import EMBEDDED, embedded_manifest_path, plan_split

    manifest = embedded_manifest_path("test", "en")
    if manifest is not None:
        rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()
                if line.strip()]
        paths = [(Path(r["audio"]) if Path(r["audio"]).is_absolute()
                  else manifest.parent / r["audio"], r["text"]) for r in rows[:n]]
        if all(path.is_file() for path, _ in paths):
            return [(str(path), text) for path, text in paths]
    import numpy as np
    import soundfile as sf

    from ..tts import get_backend

    spec = EMBEDDED["en"]
    out_dir.mkdir(parents=True, exist_ok=True)
    clips = []
    for item in plan_split(spec, "test")[:n]:
        tts = get_backend(f"espeak:{item['voice']}", sample_rate=spec.sample_rate)
        wave = tts.synthesize(item["text"], rate=item["rate"], pitch=item["pitch"])
        path = out_dir / f"{item['id']}.wav"
        sf.write(path, np.clip(wave, -1.0, 1.0), spec.sample_rate)
        clips.append((str(path), item["text"]))
    return clips


def build_demo(ask: AskFn, examples: list[tuple[str, str]], *, model_name: str,
               instruction: str, takes_instructions: bool):
    """The Gradio Blocks of the page. `instruction`: the examples' instruction."""
    import gradio as gr

    async def answer(audio_path, text):
        if not audio_path:
            return "Record or upload a clip first (or click an example below)."
        return await ask(audio_path, text or "")

    note = ("" if takes_instructions else
            " This model transcribes: the instruction is not used.")
    # Blocks delete their cached uploads every minute once older than five
    with gr.Blocks(title="speechlm", delete_cache=(60, 300)) as demo:
        gr.Markdown(f"## speechlm: talk to `{model_name}`\nRecord or upload audio, type an "
                    f"instruction (empty: transcribe), press **Ask**.{note}")
        with gr.Row():
            audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio",
                             elem_id="audio")
            with gr.Column():
                text = gr.Textbox(label="Instruction", value=instruction, lines=2,
                                  elem_id="instruction")
                ask_button = gr.Button("Ask", variant="primary", elem_id="ask")
        out = gr.Textbox(label="Answer", lines=4, interactive=False, elem_id="answer")
        if examples:
            gr.Examples([[path, instruction] for path, _ in examples], inputs=[audio, text],
                        example_labels=[f"Clip {i}: {transcript}"
                                        for i, (_, transcript) in enumerate(examples, 1)],
                        label="Example clips (embedded corpus, test split): click one, "
                              "then Ask")
        ask_button.click(answer, inputs=[audio, text], outputs=out, api_name="ask")
    return demo
