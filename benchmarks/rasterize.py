"""Benchmark fit3d_hf.splatting.rasterize (torch backend) against a dense compositor.

Measures, per (N Gaussians, image size): median forward and forward+backward time, peak RSS, and
the same for a dense compositor that evaluates every Gaussian at every pixel (gsplat's rules,
front to back via a cumulative product over all N), timed in the same run. Each configuration
runs in a fresh subprocess so that peak RSS belongs to it alone. The render is the Stage-I call:
RGB colours plus a 64-d feature pass (D = 3 + 64), one camera.

Scenes: "trained" spreads N Gaussians through a 2 × 1.5 × 2 m box 2–4 m in front of the camera,
with sizes that shrink as N grows (scale ~ 0.6 · (volume / N)^(1/3), log-normal) and opacities
uniform in [0.05, 1], like a fitted scene; "init" is a 3DGS initialisation (opacity 0.1, scale =
the mean nearest-neighbour spacing), the worst case for overlap.

The dense baseline needs N·H·W values per intermediate; it runs in pixel chunks (forward then
backward per chunk, so the arithmetic is the dense one and memory stays bounded) and is skipped
above --dense-max-elements (N·H·W).

Usage:
    python benchmarks/rasterize.py                                # full table, 2 threads
    python benchmarks/rasterize.py --sizes 10000 --resolutions 160x120 --repeats 3
    python benchmarks/rasterize.py --scene init --sizes 200000 --no-dense
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from fit3d_hf.splatting import rasterize
from fit3d_hf.splatting._torch_backend import ALPHA_MAX, ALPHA_THRESHOLD, TRANSMITTANCE_MIN, project

FEATURE_DIM = 64


def make_scene(n: int, width: int, height: int, scene: str, seed: int = 0):
    """One camera at the origin looking down +z, focal length = width (a 53° horizontal FOV)."""
    g = torch.Generator().manual_seed(seed)
    box = torch.tensor([2.0, 1.5, 2.0])
    means = (torch.rand(n, 3, generator=g) - 0.5) * box + torch.tensor([0.0, 0.0, 3.0])
    spacing = (box.prod().item() / max(n, 1)) ** (1 / 3)
    quats = torch.randn(n, 4, generator=g)
    if scene == "trained":
        scales = 0.6 * spacing * torch.exp(0.5 * torch.randn(n, 3, generator=g))
        opacities = torch.rand(n, generator=g) * 0.95 + 0.05
    else:
        scales = torch.full((n, 3), spacing)
        opacities = torch.full((n,), 0.1)
    colors = torch.rand(n, 3, generator=g)
    features = torch.randn(n, FEATURE_DIM, generator=g)
    viewmats = torch.eye(4)[None]
    Ks = torch.tensor([[[float(width), 0.0, width / 2], [0.0, float(width), height / 2], [0.0, 0.0, 1.0]]])
    return [means, quats, scales, opacities, colors, features], viewmats, Ks


def render_ours(params, viewmats, Ks, width, height):
    means, quats, scales, opacities, colors, features = params
    renders, alphas, meta = rasterize(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, features=features, backend="torch"
    )
    return torch.cat([renders, meta["features"]], dim=-1), alphas


def render_dense(params, viewmats, Ks, width, height, rows_per_chunk: int, backward: bool):
    """Every Gaussian × every pixel, in chunks of image rows; with `backward`, each chunk's
    loss (sum of squares) is back-propagated before the next, then once through the projection."""
    means, quats, scales, opacities, colors, features = params
    proj = project(means, quats, scales, opacities, viewmats, Ks, width, height, 0.01, 1e10, 0.3)
    order = torch.argsort(proj.depths.detach())
    gid = proj.gaussian_ids[order]
    leaves = [
        t.detach().requires_grad_(backward)
        for t in (proj.means2d[order], proj.conics[order], proj.opacities[order], torch.cat([colors, features], 1)[gid])
    ]
    m2d, conics, opac, chans = leaves
    xs = torch.arange(width, dtype=m2d.dtype) + 0.5
    out = []
    for y0 in range(0, height, rows_per_chunk):
        ys = torch.arange(y0, min(y0 + rows_per_chunk, height), dtype=m2d.dtype) + 0.5
        px = xs.repeat(len(ys))
        py = ys.repeat_interleave(width)
        with torch.set_grad_enabled(backward):
            dx, dy = m2d[:, 0, None] - px, m2d[:, 1, None] - py  # [N, P]
            sigma = 0.5 * (conics[:, 0, None] * dx * dx + conics[:, 2, None] * dy * dy) + conics[:, 1, None] * dx * dy
            alpha = (opac[:, None] * torch.exp(-sigma)).clamp(max=ALPHA_MAX)
            alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_THRESHOLD), alpha, 0.0)
            trans = torch.cumprod(1 - alpha, dim=0)
            alpha = torch.where(trans > TRANSMITTANCE_MIN, alpha, 0.0)
            trans_excl = torch.cat([torch.ones_like(trans[:1]), torch.cumprod(1 - alpha, dim=0)[:-1]])
            image = (alpha * trans_excl).T @ chans  # [P, D]
        if backward:
            image.square().sum().backward()
        out.append(image.detach())
    if backward:
        torch.autograd.backward([proj.means2d[order], proj.conics[order], proj.opacities[order]], [t.grad for t in leaves[:3]])
    return torch.cat(out)


def time_it(fn, repeats: int) -> tuple[float, float]:
    """Median wall-clock and process CPU seconds (user + sys, all threads) of fn, after a warm-up.

    CPU time is what the run cost even when other processes share the cores; with one thread on
    an idle machine it equals the wall-clock time.
    """
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
    return statistics.median(walls), statistics.median(cpus)


def run_one(args) -> dict:
    """Worker: one configuration, one method; prints a JSON line."""
    torch.set_num_threads(args.threads)
    width, height = args.resolution
    params, viewmats, Ks = make_scene(args.n, width, height, args.scene)
    for p in params:
        p.requires_grad_(True)

    def zero_grads():
        for p in params:
            p.grad = None

    if args.method == "ours":

        def forward():
            with torch.no_grad():
                render_ours(params, viewmats, Ks, width, height)

        def forward_backward():
            zero_grads()
            image, alphas = render_ours(params, viewmats, Ks, width, height)
            (image.square().sum() + alphas.sum()).backward()

    else:
        rows = max(1, int(args.dense_chunk_elements // (max(args.n, 1) * width)))

        def forward():
            with torch.no_grad():
                render_dense(params, viewmats, Ks, width, height, rows, backward=False)

        def forward_backward():
            zero_grads()
            render_dense(params, viewmats, Ks, width, height, rows, backward=True)

    result = {}
    result["fwd_s"], result["fwd_cpu_s"] = time_it(forward, args.repeats)
    result["fwd_bwd_s"], result["fwd_bwd_cpu_s"] = time_it(forward_backward, args.repeats)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def spawn(args, n: int, resolution: tuple[int, int], method: str) -> dict | None:
    cmd = [
        sys.executable, __file__, "--worker", "--method", method, "--n", str(n),
        "--resolution", f"{resolution[0]}x{resolution[1]}", "--scene", args.scene, "--threads", str(args.threads),
        "--repeats", str(args.repeats), "--dense-chunk-elements", str(args.dense_chunk_elements),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"  {method} N={n} {resolution}: failed (exit {proc.returncode}): {proc.stderr.strip()[-400:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_resolution(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000], help="Gaussian counts N")
    parser.add_argument("--resolutions", type=parse_resolution, nargs="+", default=[(160, 120), (320, 240)],
                        help="image sizes WxH")  # fmt: skip
    parser.add_argument("--scene", choices=["trained", "init"], default="trained",
                        help="a fitted-like scene, or a 3DGS initialisation (opacity 0.1)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median; after 1 warm-up)")
    parser.add_argument("--dense-max-elements", type=float, default=4e8,
                        help="run the dense baseline only where N*H*W is at most this")  # fmt: skip
    parser.add_argument("--dense-chunk-elements", type=float, default=2.5e7,
                        help="N * pixels per dense chunk (bounds its memory)")  # fmt: skip
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=["ours", "dense"], default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=parse_resolution, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_one(args)))
        return

    print(f"rasterize benchmark: scene={args.scene}, D=3+{FEATURE_DIM}, {args.threads} threads, "
          f"median of {args.repeats}, torch {torch.__version__}")  # fmt: skip
    print("times in seconds: wall-clock (process CPU time in brackets); RSS = peak resident memory of the run")
    columns = ["N", "W×H", "fwd", "fwd+bwd", "RSS GiB"]
    columns += ["dense fwd", "dense fwd+bwd", "dense RSS", "× fwd", "× fwd+bwd"]
    widths = [7, 8, 14, 14, 7, 16, 16, 9, 6, 9]
    print(" ".join(c.rjust(w) for c, w in zip(columns, widths)))
    rows = []
    for n in args.sizes:
        for resolution in args.resolutions:
            ours = spawn(args, n, resolution, "ours")
            dense_fits = n * resolution[0] * resolution[1] <= args.dense_max_elements
            dense = spawn(args, n, resolution, "dense") if dense_fits and not args.no_dense else None
            rows.append({"n": n, "width": resolution[0], "height": resolution[1], "ours": ours, "dense": dense})

            def timing(result, key):
                return f"{result[key + '_s']:.3f} ({result[key + '_cpu_s']:.3f})" if result else "—"

            def ratio(key, ours=ours, dense=dense):
                return f"{dense[key] / ours[key]:.0f}" if ours and dense else "—"

            cells = [
                str(n), f"{resolution[0]}×{resolution[1]}", timing(ours, "fwd"), timing(ours, "fwd_bwd"),
                f"{ours['peak_rss_gib']:.2f}" if ours else "—", timing(dense, "fwd"), timing(dense, "fwd_bwd"),
                f"{dense['peak_rss_gib']:.2f}" if dense else "—", ratio("fwd_s"), ratio("fwd_bwd_s"),
            ]  # fmt: skip
            print(" ".join(c.rjust(w) for c, w in zip(cells, widths)), flush=True)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"scene": args.scene, "threads": args.threads, "rows": rows}, f, indent=2)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
