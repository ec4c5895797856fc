"""Command-line options that every image simulator shares."""


def add_image_arguments(p, max_shift: float = 3.0) -> None:
    """--n, --snr, --box, --seed, --out and --max-shift."""
    p.add_argument("--n", type=int, required=True, help="number of particle images")
    p.add_argument("--snr", type=float, required=True, help="signal-to-noise variance ratio")
    p.add_argument("--box", type=int, required=True, help="image size in pixels")
    p.add_argument("--seed", type=int, required=True, help="random seed")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--max-shift", type=float, default=max_shift, help="largest shift per axis, pixels"
    )
