"""Train the `paper` recipe on DUTS-TR on a rented GPU machine that receives at most 64 MiB per call (the working
tree included) and returns files of at most 16 MB each, keeping what earlier calls left only while it stays warm.

Here (CPU), once:
    python tools/gpu_train.py pack                 # .gpu/: HED backbone (fp16) + DUTS-TR re-encoded, in parts
    python tools/gpu_train.py plan --minutes 7     # prints the device calls: what each carries and runs
There, call after call (each within the machine's warm window), as `plan` prints them:
    python3 tools/gpu_train.py unpack              # checks each part's SHA-256 and unpacks it to /tmp/pfanet-gpu
    python3 -m pfanet train --recipe paper ...     # bf16 autocast + channels_last on CUDA, --max-minutes
    python3 tools/gpu_train.py bring-back RUN      # weights in <= 15 MB pieces + SHA-256, log.csv, curve -> $OUT
Here again:
    python tools/gpu_train.py join FILES_AT -o runs/gpu-paper   # rejoins and checks the weights; log and curve

Everything `pack` writes goes under .gpu/ (ignored by git); parts are sized so that a call's carry plus the working
tree stays under the limit (see `plan`). Every step runs on the CPU with a tiny subset (tests/test_gpu_train.py).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tarfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pfanet.predictor import file_sha256  # the SHA-256 that ties graphs to weights

PACK = ".gpu"  # relative to the repository root, ignored by git
REMOTE_DATA = "/tmp/pfanet-gpu"
PIECE_BYTES = 15_000_000  # under the 16 MB a returned file may have
TREE_LIMIT = 64 * 2**20


def encode_pair(img_path: pathlib.Path, mask_path: pathlib.Path, side: int, quality: int) -> tuple[bytes, bytes]:
    """Image as JPEG and mask as PNG, both with a longest side of at most `side` (area-averaged, so the mask keeps
    soft edges), EXIF orientation applied to both."""
    from PIL import Image

    from pfanet.data import load_pair

    img, mask = load_pair(img_path, mask_path)
    h, w = mask.shape
    scale = min(1.0, side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    out = []
    for array, fmt, kw in ((img, "JPEG", {"quality": quality}), (mask, "PNG", {"optimize": True})):
        pil = Image.fromarray(array)
        if scale < 1:
            pil = pil.resize(size, Image.BOX)
        buf = io.BytesIO()
        pil.save(buf, fmt, **kw)
        out.append(buf.getvalue())
    return out[0], out[1]


def pack(args) -> int:
    """One tar (the backbone, the re-encoded pairs, their list files) cut into parts of `part_mib`: a device call
    carries as many parts as fit beside the working tree, and `unpack` appends them as they arrive."""
    from tqdm import tqdm

    from pfanet.data import read_pairs
    from pfanet.train import evenly_spaced
    from pfanet.weights import save_backbone

    out = pathlib.Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    stream = out / "pack.tar"
    sets = {"train": read_pairs(args.data)[: args.limit], "val": evenly_spaced(read_pairs(args.val), args.val_limit)}
    lists = {name: [] for name in sets}
    with tarfile.open(stream, "w") as tar:
        save_backbone(args.backbone, out / "backbone.safetensors")
        tar.add(out / "backbone.safetensors", "backbone.safetensors")
        (out / "backbone.safetensors").unlink()
        items = [(name, i, m) for name, pairs in sets.items() for i, m in pairs]
        for name, img_path, mask_path in tqdm(items, desc="packing", dynamic_ncols=True, disable=args.quiet):
            try:
                img, mask = encode_pair(img_path, mask_path, args.side, args.quality)
            except (ValueError, OSError) as e:  # a bad pair is reported and left out, the rest is packed
                print(f"skipped: {e}", file=sys.stderr)
                continue
            files = (f"{name}/images/{img_path.stem}.jpg", f"{name}/masks/{img_path.stem}.png")
            for member, data in zip(files, (img, mask)):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            lists[name].append("\t".join(files))
        for name, rows in lists.items():  # tab-separated: stems with spaces stay one path
            data = "".join(f"{r}\n" for r in rows).encode()
            info = tarfile.TarInfo(f"{name}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    whole = file_sha256(stream)
    part_bytes, parts = int(args.part_mib * 2**20), []
    with open(stream, "rb") as f:
        for block in iter(lambda: f.read(part_bytes), b""):
            parts.append(out / f"part_{len(parts):03d}")
            parts[-1].write_bytes(block)
    stream.unlink()
    manifest = {"side": args.side, "quality": args.quality, "backbone": args.backbone,
                "pairs": {name: len(rows) for name, rows in lists.items()}, "sha256": whole,
                "parts": {p.name: file_sha256(p) for p in parts}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    total = sum(p.stat().st_size for p in parts)
    print(f"{out}: {len(lists['train'])} train + {len(lists['val'])} val pairs and the {args.backbone} backbone, "
          f"{total / 2**20:.1f} MiB in {len(parts)} parts", file=sys.stderr)
    return 0


def unpack(args) -> int:
    """Append the parts that arrived (each checked) to the stream; once all are there, check it and unpack it."""
    src, dst = pathlib.Path(args.pack), pathlib.Path(args.to)
    manifest = json.loads((src / "manifest.json").read_text())
    dst.mkdir(parents=True, exist_ok=True)
    stream, done = dst / "pack.tar", dst / "appended.json"
    appended = json.loads(done.read_text()) if done.is_file() else []
    for name, digest in manifest["parts"].items():
        if name in appended:
            continue
        path = src / name
        if not path.is_file():
            break  # parts go in order: the rest come with a later call
        if file_sha256(path) != digest:
            print(f"{path}: SHA-256 differs from the manifest (a broken transfer): send it again", file=sys.stderr)
            return 1
        with open(stream, "ab") as f, open(path, "rb") as part:
            shutil.copyfileobj(part, f)
        appended.append(name)
        done.write_text(json.dumps(appended))
    left = [n for n in manifest["parts"] if n not in appended]
    if left:
        print(f"{dst}: {len(appended)} of {len(manifest['parts'])} parts in; still to come: {', '.join(left)}",
              file=sys.stderr)
        return 0
    if stream.is_file():
        if file_sha256(stream) != manifest["sha256"]:
            print(f"{stream}: the joined parts do not match the manifest's SHA-256", file=sys.stderr)
            return 1
        with tarfile.open(stream) as tar:
            tar.extractall(dst, filter="data")
        stream.unlink()
    print(f"{dst}: unpacked, {manifest['pairs']} pairs", file=sys.stderr)
    return 0


def train_command(minutes: float, epochs: int, out: str, device: str | None = None, data: str = REMOTE_DATA
                  ) -> list[str]:
    """The `pfanet train` command that runs on the GPU machine (also run on the CPU by the test)."""
    cmd = [sys.executable if device == "cpu" else "python3", "-m", "pfanet", "train", "--recipe", "paper",
           "--backbone", f"{data}/backbone.safetensors", "--data", f"{data}/train.txt", "--val", f"{data}/val.txt", "--epochs", str(epochs), "--max-minutes", str(minutes),
           "--save-steps", "200", "--save-every", "1", "--cache", "--no-progress", "-o", out]
    if device == "cpu":
        return cmd + ["--device", "cpu", "--workers", "0"]
    return cmd + ["--bf16", "--channels-last", "--workers", "12"]


def plan(args) -> int:
    """The device calls, in order: each carries the parts that fit beside the working tree; the last also trains."""
    pack_dir = ROOT / args.pack
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    tree = tracked_size()
    whl = sum(p.stat().st_size for p in (ROOT / ".whl").glob("*.whl")) if (ROOT / ".whl").is_dir() else 0
    budget = TREE_LIMIT - tree - whl - 2**20
    sizes = {name: (pack_dir / name).stat().st_size for name in manifest["parts"]}
    if budget < max(sizes.values()):
        print(f"the working tree is {tree / 2**20:.1f} MiB: no room for a {max(sizes.values()) / 2**20:.1f} MiB part "
              f"under the {TREE_LIMIT / 2**20:.0f} MiB a call sends. Move the shipped weights (pfanet/weights/) out "
              "of the tree for the GPU calls, or pack with a smaller --part-mib.", file=sys.stderr)
        return 1
    calls, current, used = [], [], 0
    for name, size in sizes.items():
        if current and used + size > budget:
            calls.append(current)
            current, used = [], 0
        current.append(f"{args.pack}/{name}")
        used += size
    calls.append(current)
    setup = ("python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && "
             "export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1")
    unpack_cmd = f"python3 tools/gpu_train.py unpack --to {REMOTE_DATA}"
    run = "/tmp/pfanet-gpu-run"
    train = " ".join(shlex.quote(c) for c in train_command(args.minutes, args.epochs, run))
    back = f"python3 tools/gpu_train.py bring-back {run} -o $OUT"
    print(f"working tree {tree / 2**20:.1f} MiB, room for {budget / 2**20:.1f} MiB a call: {len(calls)} device calls, "
          "each within the machine's warm window of the last. Before them, here: pip download --no-deps -d .whl "
          "pysodmetrics (pure Python; what it needs is on the machine).")
    for n, carry in enumerate(calls, 1):
        last = n == len(calls)
        cmd = f"{setup} && {unpack_cmd}" + (f" && {train}; {back}" if last else "")
        print(f"\ncall {n}: carry {json.dumps(carry + ['.whl', f'{args.pack}/manifest.json'])}"
              f"{', timeout_s ' + str(int(args.minutes * 60 + 180)) if last else ''}\n  {cmd}")
    return 0


def tracked_size() -> int:
    """Bytes of the files a device call sends without carry: tracked and untracked-not-ignored ones."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / n.decode()).stat().st_size for n in names if n and (ROOT / n.decode()).is_file())


def bring_back(args) -> int:
    """Into OUT: the run's best (else last) weights in pieces with their SHA-256, log.csv and the curve."""
    run, out = pathlib.Path(args.run), pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = next((run / n for n in ("best.safetensors", "last.safetensors") if (run / n).is_file()), None)
    if weights is None:
        print(f"{run}: no weights to bring back", file=sys.stderr)
        return 1
    data = weights.read_bytes()
    pieces = [data[i : i + args.piece_bytes] for i in range(0, len(data), args.piece_bytes)]
    for k, piece in enumerate(pieces):
        (out / f"weights.part{k:02d}").write_bytes(piece)
    (out / "weights.json").write_text(json.dumps({"name": weights.name, "sha256": hashlib.sha256(data).hexdigest(),
                                                  "pieces": len(pieces), "bytes": len(data)}))
    for name in ("log.csv", "recipe.json"):
        if (run / name).is_file():
            shutil.copy2(run / name, out / name)
    try:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot_training.py"), str(run), "-o",
                        str(out / "curve.png")], check=True)
    except (subprocess.CalledProcessError, OSError) as e:  # the weights matter more than the picture
        print(f"no curve: {e}", file=sys.stderr)
    print(f"{out}: {weights.name} in {len(pieces)} pieces", file=sys.stderr)
    return 0


def join(args) -> int:
    src, out = pathlib.Path(args.files), pathlib.Path(args.out)
    info = json.loads((src / "weights.json").read_text())
    data = b"".join((src / f"weights.part{k:02d}").read_bytes() for k in range(info["pieces"]))
    if hashlib.sha256(data).hexdigest() != info["sha256"] or len(data) != info["bytes"]:
        print(f"{src}: the rejoined weights do not match their SHA-256: a piece is missing or damaged",
              file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    (out / info["name"]).write_bytes(data)
    for name in ("log.csv", "recipe.json", "curve.png"):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    print(f"{out / info['name']}: SHA-256 checked", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    data = ROOT.parent / "shared" / "data" / "duts-tr"
    p = sub.add_parser("pack", help="backbone + DUTS-TR re-encoded into parts under .gpu/")
    p.add_argument("--data", default=str(data / "train.txt"))
    p.add_argument("--val", default=str(data / "val.txt"))
    p.add_argument("--val-limit", type=int, default=200, help="evenly spaced val pairs (default 200)")
    p.add_argument("--limit", type=int, help="only the first N training pairs (a dry run)")
    p.add_argument("--backbone", default="hed")
    p.add_argument("--side", type=int, default=256, help="longest side of the packed images (default 256)")
    p.add_argument("--quality", type=int, default=75, help="JPEG quality (default 75: DUTS-TR's own)")
    p.add_argument("--part-mib", type=float, default=14.0, help="size of one part (default 14 MiB)")
    p.add_argument("--out", default=str(ROOT / PACK))
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=pack)
    p = sub.add_parser("unpack", help="(on the GPU machine) check and unpack the parts present")
    p.add_argument("--pack", default=str(ROOT / PACK))
    p.add_argument("--to", default=REMOTE_DATA)
    p.set_defaults(func=unpack)
    p = sub.add_parser("plan", help="print the device calls")
    p.add_argument("--pack", default=PACK)
    p.add_argument("--minutes", type=float, default=7.0, help="training minutes in the last call (default 7)")
    p.add_argument("--epochs", type=int, default=50, help="the paper recipe's epochs, stretched (default 50)")
    p.set_defaults(func=plan)
    p = sub.add_parser("bring-back", help="(on the GPU machine) weights in pieces, log and curve into OUT")
    p.add_argument("run")
    p.add_argument("-o", "--out", default=os.environ.get("OUT", "gpu-out"))
    p.add_argument("--piece-bytes", type=int, default=PIECE_BYTES)
    p.set_defaults(func=bring_back)
    p = sub.add_parser("join", help="rejoin and check the weights brought back")
    p.add_argument("files", help="the folder the device call's files landed in")
    p.add_argument("-o", "--out", required=True)
    p.set_defaults(func=join)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
