HELP = "run the main job on the embedded default (builds and caches what it needs)"


def add_arguments(parser):
    parser.add_argument("--jobs", type=int, default=None,
                        help="worker processes for synthesis (default: all CPU cores)")
    parser.add_argument("--cache-dir", default=None,
                        help="where built corpora and models are kept "
                             "(default: $SPEECHLM_CACHE or ~/.cache/speechlm)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args):
    import os

    if args.cache_dir:
        os.environ["SPEECHLM_CACHE"] = args.cache_dir
    from ..demo import run_demo

    return run_demo(jobs=args.jobs, progress=not args.no_progress)
