"""Command-line options that every image simulator shares."""

from ...cli import nonnegative_float, positive_float, positive_int


def add_image_arguments(p, max_shift: float = 3.0) -> None:
    """--n, --snr, --box, --seed, --out and --max-shift."""
    p.add_argument("--n", type=positive_int, required=True, help="number of particle images")
    p.add_argument(
        "--snr", type=positive_float, required=True, help="signal-to-noise variance ratio"
    )
    p.add_argument("--box", type=positive_int, required=True, help="image size in pixels")
    p.add_argument("--seed", type=int, required=True, help="random seed")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--max-shift",
        type=nonnegative_float,
        default=max_shift,
        help="largest shift per axis, pixels",
    )
