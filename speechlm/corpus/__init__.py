"""Text corpus cleaning on datatrove (`speechlm build clean-text`).

datatrove does the reading and writing, the heuristic filters (Gopher, C4,
FineWeb quality), exact and MinHash dedup and the executors (local, Slurm,
Ray). This package adds only the speech-text parts as datatrove steps, one
module each:

    config    the YAML config, one section per stage
    reader    plain text / JSONL / gzip, bad input skipped and listed
    unicode   ftfy repair (datatrove's formatter, counting changes)
    langid    py3langid language filter (its model ships with it)
    tts       numbers written out and sentences for synthesis
    pipeline  the jobs and their executors
    report    what each stage removed, with examples and histograms
    run       runs the jobs and writes the report

Needs the `corpus` extra (pip install 'speechlm[corpus]').
"""
