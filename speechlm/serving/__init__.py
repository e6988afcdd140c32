"""Serving a model over HTTP: `speechlm serve MODEL`.

OpenAI's chat completions (audio content parts, streaming) and transcription
routes, dynamic batching of concurrent requests, and a Gradio web demo.
One job per module:
- `app`: the FastAPI routes, the api key and body-size guard;
- `protocol`: OpenAI's request and response shapes;
- `audio`: decoding and checking uploaded clips (in memory);
- `batching`: the dynamic batcher;
- `engines`: SpeechLM and CTC / Whisper models behind one `run(jobs)`;
- `streaming`: server-sent text deltas;
- `web`: the Gradio page and its example clips;
- `server`: uvicorn, for the command line and for tests.
"""
