"""The flags `python -m training.main` adds to OpenCLIP's (its parser is training/params.py), and its --help: OpenCLIP's
flags and ours in one parser, one usage block, every default shown. Renamed flags keep their old spelling for one
release (open_clip_3t/flags.py).
"""
from open_clip_3t.flags import HelpFormatter, add_renamed

from ._open_clip_train import openclip_parser
from .eval_sets import add_eval_args


def add_three_towers_args(parser):
    group = parser.add_argument_group("Three Towers (3T)")
    group.add_argument("--third-tower-weights", type=str, nargs="+", default=None, metavar="[NAME=]FILE",
                       help="Local weights file of a third tower h (timm's pretrained_cfg_overlay file door): FILE for "
                            "a model with one tower, NAME=FILE per tower for several. Default: the config's weights, "
                            "else timm's hub.")
    renamed = [
        group.add_argument("--third-tower-loss-weights", type=float, nargs="+", default=None, metavar="W",
                           help="Weight of each loss term: L(f,g), then L(f_h,h_f) and L(g_h,h_g) of each third tower "
                                "in the config's order (1 + 2K values; 3 for one tower); a weight of 0 drops that term "
                                "(its heads and temperature are frozen). Default: the config's "
                                "three_towers.loss_weights (all 1: the mean of the terms)."),
        group.add_argument("--third-tower-transfer", choices=["contrastive", "l2"], default=None,
                           help="Loss of the transfer terms: contrastive (the paper) or l2 regression (ablation). "
                                "Default: the config's transfer (contrastive)."),
        group.add_argument("--third-tower-head", choices=["linear", "mlp"], default=None,
                           help="Type of the 3T heads f_h, g_h, h_f, h_g (of every tower). Default: the config's "
                                "head_type (linear)."),
        group.add_argument("--third-tower-init-image", nargs="?", const=True, default=False, metavar="NAME",
                           help="3T finetuning: copy the weights of third tower NAME (optional with one tower) into f "
                                "before training (f must be a timm tower of its architecture, i.e. "
                                "vision_cfg.timm_model_name = that tower's timm model)."),
    ]
    group.add_argument("--third-tower-cache", type=str, nargs="+", default=None, metavar="[NAME=]DIR",
                       help="Read a third tower's embeddings from its precomputed cache (python -m open_clip_3t.cache "
                            "build) instead of running it: that tower is not built at all. DIR for a model with one "
                            "tower, NAME=DIR per cached tower for several; a tower without a cache runs online.")
    renamed.append(group.add_argument(
        "--third-tower-cache-missing", choices=["error", "skip", "online"], default="error",
        help="With --third-tower-cache: what to do with a sample missing from a cache (online builds that tower and "
             "computes it)."))
    group.add_argument("--third-tower-random", action="store_true",
                       help="Train against a third tower with random frozen weights, when its config names no "
                            "pretrained weights (timm_model_pretrained false) and no --third-tower-weights, cache or 3T "
                            "--pretrained checkpoint gives them (tests, ablations). Without it such a run stops.")
    for action in renamed:
        add_renamed(group, "training.main", action)
    group = parser.add_argument_group("Progress")
    group.add_argument("--quiet", action="store_true",
                       help="No progress bars during evaluation: one progress line per 10%% instead, as when stderr is "
                            "not a terminal (SLURM logs).")
    group = parser.add_argument_group("Models you did not train")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="Run code that comes with the model's tokenizer or Hugging Face text tower (an auto_map, "
                            "a config's tokenizer_kwargs.trust_remote_code), refused by default: only for models you "
                            "trust. See docs/untrusted_models.md.")
    group = parser.add_argument_group("Distributed")
    group.add_argument("--rendezvous-timeout", type=float, default=600, metavar="SECONDS",
                       help="How long the ranks of an env:// rendezvous (srun: MASTER_ADDR, MASTER_PORT) wait for each "
                            "other before stopping with an error naming the address; torch would wait 30 minutes.")
    group = parser.add_argument_group("LiT baseline")
    group.add_argument("--image-tower-weights", type=str, default=None, metavar="FILE",
                       help="Local timm weights for a timm image tower (e.g. the file h uses), loaded through timm's "
                            "pretrained_cfg_overlay file door; the local-file twin of --pretrained-image.")
    group = parser.add_argument_group("Long runs (step checkpoints, preemption, divergence)")
    group.add_argument("--save-every-n-steps", type=int, default=0, metavar="N",
                       help="Write a step checkpoint (checkpoints/epoch_E_step_K.pt) every N optimizer steps, from "
                            "which --resume latest goes on exactly where it stopped. Default 0: by the clock only.")
    group.add_argument("--save-every-minutes", type=float, default=30, metavar="M",
                       help="Write a step checkpoint when M minutes have passed since the last one (0: never). "
                            "SIGUSR1 and SIGTERM also write one, at the next step boundary, then stop the run.")
    group.add_argument("--keep-step-checkpoints", type=int, default=2, metavar="K",
                       help="Keep the newest K step checkpoints (older ones are removed once a newer one is "
                            "complete); OpenCLIP's epoch checkpoints are kept as --save-frequency says.")
    group.add_argument("--skip-nonfinite-steps", type=int, default=0, metavar="K",
                       help="Skip an update whose loss or gradients are not finite, at most K in a row (each logged); "
                            "default 0: the run stops at the first one.")
    return parser


def print_help():
    """One help text: OpenCLIP's flags and ours in one parser (one usage block), every default shown."""
    make_parser().print_help()


def make_parser():
    """The whole command line of `python -m training.main` in one parser: OpenCLIP's flags and ours (for --help and
    the tests; training.params parses ours first, then hands the rest to OpenCLIP's own parse_args)."""
    parser = openclip_parser()
    parser.prog, parser.formatter_class = "python -m training.main", HelpFormatter
    parser.usage = "%(prog)s --model NAME --train-data SHARDS [FLAGS]"
    parser.description = ("OpenCLIP's trainer (open_clip_train: every one of its flags) for 3T, LiT and the CLIP "
                          "baseline, with the 3T flags below. See docs/training.md.")
    add_three_towers_args(parser)
    add_eval_args(parser)
    return parser
