HELP = "train from a YAML recipe (any field can be overridden as key=value)"


def add_arguments(parser):
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny/ctc_en.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. train.max_steps=20 train.lr=3e-4")
    parser.add_argument("--print-config", action="store_true",
                        help="print the validated config (with overrides) and exit")


def run(args):
    from ..recipes import load_recipe

    module, config = load_recipe(args.recipe, args.overrides)
    if args.print_config:
        import yaml

        from ..config import config_to_dict

        print(yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True))
        return 0
    module.run(config)
    return 0
