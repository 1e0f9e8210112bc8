"""Train the default model on a lent GPU machine in at most two device calls, so that the run survives the machine
being lost between them.

The machine receives at most 64 MiB a call (working tree + `carry`), returns at most 8 files of 16 MiB, and keeps
what a call left only while it stays warm (30 s after each call); a later call may find a fresh, bare one. Hence:

- DUTS-TR is packed small (WebP images, lossless-WebP masks, longest side 256) into self-contained parts: each part
  is a .tar.gz of whole pairs with its own list, so training uses whatever parts arrived. Losing the machine between
  the calls costs data, not the run.
- The shipped weights (48 MB of tracked files) leave the working tree for the calls (`stow`, then `restore`); the
  training's init travels as a file of the second call instead.
- Call 2 carries the init, the validation pairs and as many parts as fit, and trains on its own if need be; call 1
  carries the rest of the parts, unpacked on the machine where call 2 finds them if the machine is still the same.
  When everything fits in call 2, there is one call.

Here (CPU):
    python tools/gpu_train.py pack                # once: .gpu/parts/ (DUTS-TR train, shuffled, in ~2 MiB parts + val)
    python tools/gpu_train.py plan --minutes 7.5  # stages .gpu/call1, .gpu/call2; prints the calls (.gpu/plan.json)
    python tools/gpu_train.py stow                # the shipped weights out of the tree (a watchdog puts them back)
There, as `plan` prints them, back to back:
    call 1: python3 tools/gpu_train.py unpack .gpu/call1 -o $OUT
    call 2: python3 tools/gpu_train.py unpack .gpu/call2 && python3 tools/gpu_train.py train ...;
            python3 tools/gpu_train.py bring-back .gpu/run -o $OUT
Here again:
    python tools/gpu_train.py restore             # the weights back (join does it too)
    python tools/gpu_train.py join FILES_AT -o runs/gpu   # rejoins and checks the weights; log, recipe, curve

Everything here goes under .gpu/ (ignored by git). tests/test_gpu_train.py rehearses the calls on the CPU with a
tiny subset: a copy of the tree as a call makes it, the printed commands, a plain python3 without pfanet installed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import math
import os
import pathlib
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPU = ROOT / ".gpu"  # ignored by git: nothing under it travels unless a call carries it
PARTS, STOW, DATA, RUN = GPU / "parts", GPU / "stowed", GPU / "data" / "duts-tr", GPU / "run"
STOW_RECORD = STOW / "stowed.json"
WEIGHTS = ("pfanet/weights/*.safetensors", "pfanet/weights/*.onnx")  # what `stow` moves out of the tree
SHIPPED = "pfanet/weights/pfanet_duts.safetensors"
# The device tool's limits (/work/.library/device/README.md).
TREE_LIMIT = 64 * 2**20  # working tree + carry, one call
MARGIN = 3 * 2**20 // 2  # for files others add to the tree between `plan` and the call
CALL_SECONDS = 600  # one command
OUT_FILES, OUT_FILE_BYTES, OUT_DEPTH = 8, 16 * 2**20, 2
PIECE_BYTES = 15_000_000  # a returned weights piece, under the 16 MiB a file may have
COMMAND_CHARS = 2000
# What the run starts from (plan --start): the shipped model, fine-tuned with the default model's campaign recipe at
# the GPU's batch (lr scaled by the square root of the batch: 1e-4 at batch 8, 2e-4 at 32; warm-up the same 1,600
# images), or the HED backbone with the paper's recipe (which must first redo the CPU's 70,000 images: not the
# default while the machine's speed is unmeasured; docs/TRAINING.md).
STARTS = {
    "init": {"recipe": "cpu-duts-iou", "size": 256, "batch_size": 32, "lr": 2e-4, "warmup_steps": 50},
    "backbone": {"recipe": "paper", "size": 256},
}


def sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: pathlib.Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # a crash never leaves half a record


# ---- pack (here) --------------------------------------------------------------------------------------------------


def encode_pair(pair: tuple[pathlib.Path, pathlib.Path], side: int, fmt: str, quality: int
                ) -> tuple[bytes, bytes] | str:
    """Image and mask with a longest side of at most `side` (area-averaged, so the mask keeps soft edges), EXIF
    orientation applied: WebP (method 6: 6% smaller than the default for twice the time) and lossless WebP, or
    JPEG and PNG. A pair that cannot be read comes back as its error message."""
    from PIL import Image

    from pfanet.data import load_pair

    try:
        img, mask = load_pair(*pair)
    except (ValueError, OSError) as e:
        return str(e)
    h, w = mask.shape
    scale = min(1.0, side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    kinds = ((img, "WEBP", {"quality": quality, "method": 6}), (mask, "WEBP", {"lossless": True})) if fmt == "webp" \
        else ((img, "JPEG", {"quality": quality}), (mask, "PNG", {"optimize": True}))
    out = []
    for array, pil_format, kw in kinds:
        pil = Image.fromarray(array)
        if scale < 1:
            pil = pil.resize(size, Image.BOX)
        buf = io.BytesIO()
        pil.save(buf, pil_format, **kw)
        out.append(buf.getvalue())
    return out[0], out[1]


def write_part(path: pathlib.Path, name: str, rows: list[tuple[str, bytes, bytes]], ext: tuple[str, str]) -> int:
    """A tar of whole pairs under duts-tr/NAME/ and their list duts-tr/NAME.txt (tab-separated, relative to it),
    gzipped: WebP does not compress, but the tar's headers and padding (15% of a part of small files) do."""
    def add(tar, member, data):
        info = tarfile.TarInfo(f"duts-tr/{member}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        lines = []
        for stem, img, mask in rows:
            files = (f"{name}/images/{stem}.{ext[0]}", f"{name}/masks/{stem}.{ext[1]}")
            add(tar, files[0], img)
            add(tar, files[1], mask)
            lines.append("\t".join(files))
        add(tar, f"{name}.txt", "".join(f"{line}\n" for line in lines).encode())
    return len(rows)


def pack(args) -> int:
    """DUTS-TR train, shuffled (each part a random sample, so any subset of parts is a fair one), into parts of
    about `part_mib`, and the validation pairs as one more part."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    from tqdm import tqdm

    from pfanet.data import read_pairs
    from pfanet.train import evenly_spaced

    out = pathlib.Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    train = read_pairs(args.data)
    random.Random(0).shuffle(train)
    train = train[: args.limit]
    val = evenly_spaced(read_pairs(args.val), args.val_limit)
    ext = ("webp", "webp") if args.format == "webp" else ("jpg", "png")
    encode = partial(encode_pair, side=args.side, fmt=args.format, quality=args.quality)
    parts, part_bytes = {}, int(args.part_mib * 2**20)
    with ProcessPoolExecutor(args.jobs) if args.jobs > 1 else contextlib.nullcontext() as pool:
        for name, pairs in (("val", val), ("train", train)):
            rows, size = [], 0
            encoded = pool.map(encode, pairs, chunksize=8) if pool else map(encode, pairs)
            for (img_path, _), got in tqdm(zip(pairs, encoded), total=len(pairs), desc=f"packing {name}",
                                           dynamic_ncols=True, disable=args.quiet):
                if isinstance(got, str):  # a bad pair is reported and left out, the rest is packed
                    print(f"skipped: {got}", file=sys.stderr)
                    continue
                if name == "train" and rows and size + len(got[0]) + len(got[1]) + 200 > part_bytes:
                    part = f"train_{len(parts) - 1:03d}"  # parts holds val already
                    parts[part] = write_part(out / f"{part}.tar.gz", part, rows, ext)
                    rows, size = [], 0
                rows.append((img_path.stem, *got))
                size += len(got[0]) + len(got[1]) + 200  # + two tar headers, gzipped
            part = "val" if name == "val" else f"train_{len(parts) - 1:03d}"
            if rows:
                parts[part] = write_part(out / f"{part}.tar.gz", part, rows, ext)
    manifest = {"format": args.format, "side": args.side, "quality": args.quality, "data": str(args.data),
                "val": str(args.val),
                "parts": {p: {"pairs": n, "bytes": (out / f"{p}.tar.gz").stat().st_size,
                              "sha256": sha256(out / f"{p}.tar.gz")} for p, n in parts.items()}}
    write_json(out / "manifest.json", manifest)
    train_parts = {p: v for p, v in manifest["parts"].items() if p != "val"}
    print(f"{out}: {sum(v['pairs'] for v in train_parts.values())} train pairs in {len(train_parts)} parts, "
          f"{sum(v['bytes'] for v in train_parts.values()) / 2**20:.1f} MiB; {manifest['parts']['val']['pairs']} "
          f"val pairs, {manifest['parts']['val']['bytes'] / 2**20:.2f} MiB ({args.format}, longest side "
          f"{args.side}, quality {args.quality})", file=sys.stderr)
    return 0


# ---- plan (here) --------------------------------------------------------------------------------------------------


def stowable() -> list[pathlib.Path]:
    return sorted(p for pattern in WEIGHTS for p in ROOT.glob(pattern))


def tree_bytes() -> int:
    """Bytes a device call sends without carry, once the weights are stowed: tracked and untracked-not-ignored
    files, those that exist (a stowed file is missing from the tree and does not travel)."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    skip = {p.relative_to(ROOT).as_posix() for pattern in WEIGHTS for p in ROOT.glob(pattern)}
    paths = (ROOT / n.decode() for n in names if n and n.decode() not in skip)
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def folder_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def stage_init(start: str, dst: pathlib.Path) -> tuple[str, pathlib.Path]:
    """The file the run starts from, into the call's folder: ("init", a PFANet checkpoint) or ("backbone", the
    HED VGG16 as a 29 MB fp16 safetensors)."""
    if start == "hed":
        from pfanet.weights import save_backbone

        save_backbone("hed", dst / "backbone.safetensors")
        return "backbone", dst / "backbone.safetensors"
    src = ROOT / SHIPPED if start == "shipped" else pathlib.Path(start)
    if start == "shipped" and not src.is_file() and (STOW / src.name).is_file():
        src = STOW / src.name  # already stowed
    shutil.copyfile(src, dst / "init.safetensors")
    return "init", dst / "init.safetensors"


def stage_site(dst: pathlib.Path) -> None:
    """pysodmetrics (validation's metrics) is not on the machine; its dependencies are. Pure Python: the package
    folder travels and goes on PYTHONPATH."""
    import importlib.util

    spec = importlib.util.find_spec("py_sod_metrics")
    shutil.copytree(next(iter(spec.submodule_search_locations)), dst / "site" / "py_sod_metrics",
                    ignore=shutil.ignore_patterns("__pycache__"))


def link(src: pathlib.Path, dst: pathlib.Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def train_args(args, kind: str, init: str) -> list[str]:
    """The `gpu_train.py train` arguments of call 2 (the recipe's GPU overrides, the minutes)."""
    settings = {**STARTS[kind], **{k: v for k, v in (("recipe", args.recipe), ("size", args.size),
                                                      ("batch_size", args.batch_size), ("lr", args.lr),
                                                      ("warmup_steps", args.warmup_steps)) if v is not None}}
    out = [f"--{kind}", init]
    for key, value in settings.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out + ["--minutes", str(args.minutes), "--probe-minutes", str(args.probe_minutes),
                  "--workers", str(args.workers)]


def plan(args) -> int:
    """Stage .gpu/call2 (init, val, pysodmetrics, as many parts as fit) and .gpu/call1 (the rest), and print the
    calls. Call 2 is filled first: it alone must be able to train."""
    if not (PARTS / "manifest.json").is_file():
        print(f"{PARTS}: nothing packed: run `python tools/gpu_train.py pack` first", file=sys.stderr)
        return 1
    manifest = json.loads((PARTS / "manifest.json").read_text())
    limit = int(args.limit_mib * 2**20) - MARGIN
    tree = tree_bytes()
    seconds = math.ceil(args.minutes * 60 + 90)  # + unpack, the last validation, bring-back
    if seconds > CALL_SECONDS:
        print(f"--minutes {args.minutes}: call 2 would need timeout_s {seconds}, over the {CALL_SECONDS} s a call "
              f"may run; at most {(CALL_SECONDS - 90) / 60:.1f}", file=sys.stderr)
        return 1
    calls = {n: GPU / f"call{n}" for n in (1, 2)}
    for folder in calls.values():
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    kind, init = stage_init(args.start, calls[2])
    stage_site(calls[2])
    link(PARTS / "val.tar.gz", calls[2] / "val.tar.gz")
    room = {2: limit - tree - folder_bytes(calls[2]), 1: limit - tree}
    if room[2] < 0:
        print(f"the tree ({tree / 2**20:.1f} MiB) and call 2's init and val leave no room under "
              f"{limit / 2**20:.1f} MiB: are the shipped weights the only large files?", file=sys.stderr)
        return 1
    chosen, left = {1: [], 2: []}, []
    for part, info in manifest["parts"].items():
        if part == "val":
            continue
        n = next((n for n in (2, 1) if info["bytes"] <= room[n]), None)
        if n is None:
            left.append(part)
            continue
        room[n] -= info["bytes"]
        chosen[n].append(part)
        link(PARTS / f"{part}.tar.gz", calls[n] / f"{part}.tar.gz")
    for n, folder in calls.items():
        write_json(folder / "sha256.json", {p.name: sha256(p) for p in sorted(folder.glob("*")) if p.is_file()})
    pairs = {n: sum(manifest["parts"][p]["pairs"] for p in chosen[n]) for n in calls}
    env = "export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD"
    steps = []
    if chosen[1]:
        steps.append({"call": 1, "carry": [".gpu/call1"], "timeout_s": 120,
                      "command": f"{env}; python3 tools/gpu_train.py unpack .gpu/call1 -o $OUT"})
    else:
        shutil.rmtree(calls[1])
    train = " ".join(shlex.quote(a) for a in train_args(args, kind, init.relative_to(ROOT).as_posix()))
    steps.append({"call": 2, "carry": [".gpu/call2"], "timeout_s": seconds,
                  "command": f"{env}:$PWD/.gpu/call2/site; python3 tools/gpu_train.py unpack .gpu/call2 && "
                             f"python3 tools/gpu_train.py train {train}; "
                             "python3 tools/gpu_train.py bring-back .gpu/run -o $OUT"})
    for step in steps:
        assert len(step["command"]) <= COMMAND_CHARS, step["command"]
        step["bytes"] = tree + folder_bytes(calls[step["call"]])
    write_json(GPU / "plan.json", {"tree_bytes": tree, "pairs": {f"call{n}": k for n, k in pairs.items()},
                                   "left_out": left, "calls": steps})

    total = sum(v["pairs"] for p, v in manifest["parts"].items() if p != "val")
    print(f"tree without the shipped weights {tree / 2**20:.1f} MiB; call 2: {kind} + val + {pairs[2]} train pairs "
          f"(trains on these alone if the machine was lost), call 1: {pairs[1]} more; {total} packed"
          + (f", {len(left)} parts left out ({', '.join(left)}): no room" if left else ""))
    print("\nhere: python tools/gpu_train.py stow")
    for i, step in enumerate(steps, 1):
        print(f"\ndevice run {i} of {len(steps)} (call {step['call']}, {step['bytes'] / 2**20:.1f} MiB): "
              f"carry {json.dumps(step['carry'])}, timeout_s {step['timeout_s']}\n  {step['command']}")
    print("\nthen: give_back; here: python tools/gpu_train.py restore && python tools/gpu_train.py join FILES_AT -o "
          "runs/gpu")
    return 0


# ---- stow / restore (here) ----------------------------------------------------------------------------------------


def stow(args) -> int:
    """Move the shipped weights to .gpu/stowed (ignored, never carried), recording their SHA-256 first, and start a
    watchdog that puts them back after `watchdog_minutes` if `restore` has not."""
    if STOW_RECORD.exists():
        print(f"{STOW_RECORD}: the weights of an earlier stow were not put back: run `python tools/gpu_train.py "
              "restore` first", file=sys.stderr)
        return 1
    files = stowable()
    if not files:
        print(f"no {' or '.join(WEIGHTS)} to stow", file=sys.stderr)
        return 1
    STOW.mkdir(parents=True, exist_ok=True)
    record = {"files": {p.relative_to(ROOT).as_posix(): sha256(p) for p in files}, "watchdog": None}
    write_json(STOW_RECORD, record)  # before anything moves: a crash leaves a record that `restore` follows
    try:
        for p in files:
            os.rename(p, STOW / p.name)  # same file system: nothing is copied, nothing half-written
    except BaseException:
        restore_files()
        raise
    if args.watchdog_minutes > 0:
        log = open(STOW / "watchdog.log", "a")  # noqa: SIM115 -- the watchdog holds it
        watchdog = subprocess.Popen([sys.executable, str(pathlib.Path(__file__).resolve()), "restore", "--after",
                                     str(args.watchdog_minutes * 60)], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=log, start_new_session=True)  # outlives this process and the session
        record["watchdog"] = watchdog.pid
        write_json(STOW_RECORD, record)
    size = sum((STOW / pathlib.Path(f).name).stat().st_size for f in record["files"])
    print(f"moved {len(files)} files ({size / 1e6:.0f} MB) to {STOW}; `python tools/gpu_train.py restore` puts "
          "them back" + (f", as the watchdog (pid {record['watchdog']}) will in {args.watchdog_minutes:g} minutes"
                         if record["watchdog"] else ""), file=sys.stderr)
    return 0


def restore_files() -> list[str]:
    """Put stowed files back; returns the problems (none: the record is removed). A file found back in the tree
    already (someone checked it out) is kept; the stowed copy then goes only if it is the same."""
    import fcntl

    problems = []
    with open(STOW / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the watchdog and a `restore` at the same moment
        if not STOW_RECORD.exists():
            return []
        record = json.loads(STOW_RECORD.read_text())
        for rel, digest in record["files"].items():
            src, dst = STOW / pathlib.Path(rel).name, ROOT / rel
            if not src.exists():
                if not (dst.exists() and sha256(dst) == digest):
                    problems.append(f"{rel}: neither in the tree nor in {STOW} (git show HEAD:{rel} has the "
                                    "committed one)")
            elif dst.exists():
                if sha256(dst) == digest:
                    src.unlink()
                else:
                    problems.append(f"{rel}: the tree has another file there now; the stowed one stays at {src}")
            else:
                if sha256(src) != digest:
                    problems.append(f"{rel}: the stowed file changed since it was stowed (moved back anyway)")
                os.rename(src, dst)
        if not any("stays at" in p or "neither" in p for p in problems):
            STOW_RECORD.unlink()
    return problems


def restore(args) -> int:
    if args.after:
        time.sleep(args.after)
    if not STOW_RECORD.exists():
        print("nothing stowed: the weights are in the tree", file=sys.stderr)
        return 0
    watchdog = json.loads(STOW_RECORD.read_text()).get("watchdog")
    if args.after and watchdog != os.getpid():
        return 0  # the watchdog of an earlier stow, restored since: this stow has its own
    for p in restore_files():
        print(p, file=sys.stderr)
    if STOW_RECORD.exists():
        return 1
    if not args.after and watchdog:  # restored by hand: the watchdog has nothing left to do
        try:
            if b"gpu_train.py" in pathlib.Path(f"/proc/{watchdog}/cmdline").read_bytes():
                os.kill(watchdog, signal.SIGTERM)
        except OSError:
            pass
    print(f"the weights are back in {ROOT / 'pfanet' / 'weights'} (SHA-256 checked)", file=sys.stderr)
    return 0


# ---- unpack, train, bring-back (there) ----------------------------------------------------------------------------


def pil_reads_webp() -> bool:
    from PIL import features

    return bool(features.check("webp"))


def transcode_webp(part: pathlib.Path, listing: pathlib.Path) -> None:
    """The machine's Pillow lacks WebP: decode the part's files with OpenCV (on the machine) into PNG, losslessly,
    and rewrite its list."""
    import cv2

    for path in part.rglob("*.webp"):
        data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if data is None or not cv2.imwrite(str(path.with_suffix(".png")), data):
            raise OSError(f"{path}: OpenCV could not transcode it")
        path.unlink()
    listing.write_text(listing.read_text().replace(".webp", ".png"))


def machine_report(out: str | None) -> dict:
    import platform

    report = {"python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        from PIL import __version__ as pil_version

        report.update(pillow=pil_version, pillow_webp=pil_reads_webp())
        import torch

        report.update(torch=torch.__version__, cuda=torch.cuda.is_available(),
                      gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
        import pfanet

        report["pfanet"] = str(pathlib.Path(pfanet.__file__).resolve().parent)
        import cv2

        report["opencv"] = cv2.__version__
    except ImportError as e:
        report["missing"] = str(e)
    print(json.dumps(report))
    if out:
        pathlib.Path(out).mkdir(parents=True, exist_ok=True)
        write_json(pathlib.Path(out) / "machine.json", report)
    return report


def unpack(args) -> int:
    """Check and unpack the parts a call carried into .gpu/data (ignored by git: kept between calls while the machine
    stays warm), skipping those unpacked by an earlier call; then list every part present in duts-tr/train.txt.
    A damaged part is left out (data lost, not the run); a damaged init fails the call."""
    folder = pathlib.Path(args.folder)
    sums = json.loads((folder / "sha256.json").read_text())
    DATA.mkdir(parents=True, exist_ok=True)
    webp = pil_reads_webp()
    status = 0
    for name, digest in sums.items():
        path, part = folder / name, name.removesuffix(".tar.gz")
        ok = path.is_file() and sha256(path) == digest
        if not name.endswith(".tar.gz"):
            if not ok:
                print(f"{path}: missing or damaged (SHA-256): this call cannot train", file=sys.stderr)
                status = 1
            continue
        if (DATA / f".{part}.done").exists():
            continue
        if not ok:
            print(f"{path}: missing or damaged (SHA-256): left out", file=sys.stderr)
            continue
        with tarfile.open(path) as tar:
            tar.extractall(DATA.parent, filter="data")
        if not webp and any((DATA / part).rglob("*.webp")):
            transcode_webp(DATA / part, DATA / f"{part}.txt")
        (DATA / f".{part}.done").touch()  # a part counts once whole: an interrupted one is unpacked again
    parts = sorted(p.name[1:-5] for p in DATA.glob(".train_*.done"))
    lines = [line for part in parts for line in (DATA / f"{part}.txt").read_text().splitlines()]
    (DATA / "train.txt").write_text("".join(f"{line}\n" for line in lines))
    print(f"{DATA}: {len(lines)} train pairs in {len(parts)} parts, val "
          f"{'present' if (DATA / '.val.done').exists() else 'absent'}; Pillow reads WebP: {webp}")
    machine_report(args.out)
    return status


def stream(cmd: list[str], log) -> tuple[int, float | None]:
    """Run `cmd`, copying its output to ours and to the log; returns its exit status and when it said
    "started"/"resumed" (its set-up done: data cached, model on the GPU)."""
    print("$", shlex.join(cmd), file=log, flush=True)
    ready = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as p:
        for line in p.stdout:
            sys.stdout.write(line)
            log.write(line)
            if ready is None and re.match(r"INFO (started|resumed) ", line):
                ready = time.monotonic()
    log.flush()
    return p.returncode, ready


def train(args) -> int:
    """`pfanet train` for `minutes` of wall time, its cosine ending on time: a probe of `probe_minutes` measures
    the images per second of the whole loop (data, steps, checkpoints), then the run resumes rescheduled to the
    epochs that fit what is left (--max-minutes stops it in any case, with a validated checkpoint)."""
    deadline = time.monotonic() + args.minutes * 60
    pairs = len((DATA / "train.txt").read_text().splitlines())
    if RUN.exists():
        shutil.rmtree(RUN)
    RUN.mkdir(parents=True)
    start = ["--init", args.init] if args.init else ["--backbone", args.backbone]
    base = ["python3", "-m", "pfanet", "train", "--recipe", args.recipe, *start, "--size", str(args.size),
            "--data", str(DATA / "train.txt"), "--val", str(DATA / "val.txt"), "-o", str(RUN), "--cache",
            "--workers", str(args.workers), "--no-progress", "--save-every", "100000"]
    base += [a for k in ("batch_size", "lr", "warmup_steps") if getattr(args, k) is not None
             for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    guess = max(1, round(args.guess_images_per_s * args.minutes * 60 / pairs))
    with open(RUN / "train.log", "a") as log:
        log.write(json.dumps(machine_report(None)) + "\n")
        t0 = time.monotonic()
        rc, ready = stream(base + ["--epochs", str(guess), "--max-minutes", str(args.probe_minutes),
                                   "--val-every", "100000"], log)
        ended = time.monotonic()
        rows = []
        if (RUN / "log.csv").is_file():
            with open(RUN / "log.csv", newline="") as f:
                rows = list(csv.DictReader(f))
        if rc != 0 or not rows:
            print(f"the probe failed (exit {rc}): no training", file=sys.stderr)
            return rc or 1
        position, images = float(rows[-1]["epoch"]), float(rows[-1]["images"])
        setup = (ready or t0) - t0  # the resumed process sets up again
        rate = images / max(ended - (ready or t0), 1e-6)
        left = deadline - time.monotonic() - setup
        # a tenth of what is left for the validations (about six) and the checkpoints the probe did not make
        epochs = max(math.floor(position) + 1, math.floor(position + 0.9 * rate * max(left, 0) / pairs))
        msg = (f"probe: {images:.0f} images in {ended - (ready or t0):.0f} s after {setup:.0f} s of set-up "
               f"({rate:.1f} images/s); {left:.0f} s left: {epochs} epochs of {pairs} pairs")
        print(msg)
        log.write(msg + "\n")
        rc, _ = stream(base + ["--resume", "--reschedule", "--epochs", str(epochs), "--max-minutes",
                               f"{max(left, 1) / 60:.3f}", "--val-every", str(max(1, (epochs - int(position)) // 6))],
                       log)
    return rc


def out_problems(out: pathlib.Path) -> list[str]:
    """What the device tool would not bring back from $OUT (its limits, README.md)."""
    files = [p for p in out.rglob("*") if p.is_file()]
    problems = [f"{len(files)} files: at most {OUT_FILES} come back"] if len(files) > OUT_FILES else []
    for p in files:
        rel = p.relative_to(out)
        if p.stat().st_size > OUT_FILE_BYTES:
            problems.append(f"{rel}: {p.stat().st_size} bytes, over {OUT_FILE_BYTES}")
        if len(rel.parts) > OUT_DEPTH + 1:
            problems.append(f"{rel}: more than {OUT_DEPTH} folders down")
        if not all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts):
            problems.append(f"{rel}: a name with characters other than letters, digits, '.', '_' and '-'")
    return problems


def bring_back(args) -> int:
    """Into OUT, at most 8 files: the best-MAE (else last) weights as fp16 in pieces of PIECE_BYTES, their SHA-256
    and validation scores, log.csv, recipe.json, the curve and the training's output."""
    import torch

    from pfanet.weights import load_checkpoint, save_checkpoint

    run, out = pathlib.Path(args.run), pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("log.csv", "recipe.json"):
        if (run / name).is_file():
            shutil.copy2(run / name, out / name)
    if (run / "train.log").is_file():  # its end, should it ever grow past what may come back
        (out / "train.log").write_bytes((run / "train.log").read_bytes()[-OUT_FILE_BYTES // 2:])
    try:
        subprocess.run(["python3", str(ROOT / "benchmarks" / "plot_training.py"), str(run), "-o",
                        str(out / "curve.png")], check=True)
    except (subprocess.CalledProcessError, OSError) as e:  # the weights matter more than the picture
        print(f"no curve: {e}", file=sys.stderr)
    chosen = next((run / n for n in ("best_mae.safetensors", "last.safetensors") if (run / n).is_file()), None)
    if chosen is None:
        print(f"{run}: no weights to bring back", file=sys.stderr)
        return 1
    model, spec, meta = load_checkpoint(chosen)
    half = run / "fp16.safetensors"
    save_checkpoint(half, model, spec, meta.get("training"), dtype=torch.float16)  # as shipped: half the pieces
    data = half.read_bytes()
    pieces = [data[i : i + args.piece_bytes] for i in range(0, len(data), args.piece_bytes)]
    for k, piece in enumerate(pieces):
        (out / f"weights.part{k:02d}").write_bytes(piece)
    training = meta.get("training", {})
    write_json(out / "weights.json", {"name": f"gpu_{chosen.stem}.safetensors", "from": chosen.name,
                                      "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                                      "pieces": len(pieces), "images_seen": training.get("images_seen"),
                                      "val_scores": training.get("val_scores")})
    problems = out_problems(out)
    for p in problems:
        print(f"{out}: {p}", file=sys.stderr)
    print(f"{out}: {chosen.name} as fp16 in {len(pieces)} pieces, val {training.get('val_scores')}")
    return 1 if problems else 0


# ---- join (here) --------------------------------------------------------------------------------------------------


def join(args) -> int:
    if STOW_RECORD.exists():
        print("the shipped weights are still stowed: putting them back first", file=sys.stderr)
        restore(argparse.Namespace(after=0))
    src, out = pathlib.Path(args.files), pathlib.Path(args.out)
    info = json.loads((src / "weights.json").read_text())
    data = b"".join((src / f"weights.part{k:02d}").read_bytes() for k in range(info["pieces"]))
    if hashlib.sha256(data).hexdigest() != info["sha256"] or len(data) != info["bytes"]:
        print(f"{src}: the rejoined weights do not match their SHA-256: a piece is missing or damaged",
              file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    (out / info["name"]).write_bytes(data)
    for name in ("log.csv", "recipe.json", "curve.png", "train.log", "weights.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    print(f"{out / info['name']}: SHA-256 checked; DUTS-TR val (200) at the run's size: {info['val_scores']}",
          file=sys.stderr)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    data = ROOT.parent / "shared" / "data" / "duts-tr"
    p = sub.add_parser("pack", help="DUTS-TR re-encoded into self-contained parts under .gpu/parts")
    p.add_argument("--data", default=str(data / "train.txt"))
    p.add_argument("--val", default=str(data / "val.txt"))
    p.add_argument("--val-limit", type=int, default=200, help="evenly spaced val pairs (default 200)")
    p.add_argument("--limit", type=int, help="only N training pairs (a dry run)")
    p.add_argument("--side", type=int, default=256, help="longest side of the packed images (default 256)")
    p.add_argument("--format", choices=["webp", "jpeg"], default="webp",
                   help="webp: WebP images, lossless-WebP masks (default); jpeg: JPEG images, PNG masks (~1.4x)")
    p.add_argument("--quality", type=int, default=75, help="image quality (default 75)")
    p.add_argument("--part-mib", type=float, default=2.0, help="size of one part (default 2 MiB)")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="encoding processes (default: all CPUs)")
    p.add_argument("--out", default=str(PARTS))
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=pack)
    p = sub.add_parser("plan", help="stage .gpu/call1 and .gpu/call2 and print the device calls")
    p.add_argument("--start", default="shipped",
                   help="shipped (default: the shipped model, fine-tuned), hed (the paper recipe from the HED "
                        "backbone), or a PFANet .safetensors to fine-tune")
    p.add_argument("--minutes", type=float, default=7.5, help="wall-clock training minutes in call 2 (default 7.5)")
    p.add_argument("--probe-minutes", type=float, default=1.0, help="of which the speed probe (default 1)")
    p.add_argument("--recipe", help="default: cpu-duts-iou from a model, paper from the backbone")
    p.add_argument("--size", type=int, help="training size (default 256)")
    p.add_argument("--batch-size", type=int, help="default 32 from a model, the recipe's from the backbone")
    p.add_argument("--lr", type=float, help="default 2e-4 from a model, the recipe's from the backbone")
    p.add_argument("--warmup-steps", type=int, help="default 50 from a model, the recipe's from the backbone")
    # Augmenting a 256 sample costs about 13 ms of CPU (measured here on the packed pairs): 14 processes feed about
    # 1,000 images/s, leaving the training process and the system a CPU each.
    p.add_argument("--workers", type=int, default=14, help="data processes there (default 14 of its 16 CPUs)")
    p.add_argument("--limit-mib", type=float, default=TREE_LIMIT / 2**20, help="what one call may send (64)")
    p.set_defaults(func=plan)
    p = sub.add_parser("stow", help="move the shipped weights out of the tree for the device calls")
    p.add_argument("--watchdog-minutes", type=float, default=20,
                   help="put them back after this long unless `restore` has (default 20; 0: no watchdog)")
    p.set_defaults(func=stow)
    p = sub.add_parser("restore", help="put the stowed weights back (SHA-256 checked)")
    p.add_argument("--after", type=float, default=0, help=argparse.SUPPRESS)  # the watchdog's wait, in seconds
    p.set_defaults(func=restore)
    p = sub.add_parser("unpack", help="(there) check and unpack the parts a call carried")
    p.add_argument("folder", help=".gpu/call1 or .gpu/call2")
    p.add_argument("-o", "--out", help="also write machine.json (Python, torch, GPU, Pillow's WebP) here")
    p.set_defaults(func=unpack)
    p = sub.add_parser("train", help="(there) the probe, then the rescheduled run, for --minutes")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--init", help="a PFANet checkpoint to fine-tune")
    g.add_argument("--backbone", help="a backbone file to train from")
    p.add_argument("--recipe", required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--minutes", type=float, required=True)
    p.add_argument("--probe-minutes", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=14)
    p.add_argument("--guess-images-per-s", type=float, default=600, help=argparse.SUPPRESS)  # the probe's schedule
    p.set_defaults(func=train)
    p = sub.add_parser("bring-back", help="(there) weights in pieces, log, recipe, curve into OUT")
    p.add_argument("run")
    p.add_argument("-o", "--out", default=os.environ.get("OUT", "gpu-out"))
    p.add_argument("--piece-bytes", type=int, default=PIECE_BYTES)
    p.set_defaults(func=bring_back)
    p = sub.add_parser("join", help="rejoin and check the weights brought back (restores stowed weights first)")
    p.add_argument("files", help="the folder the device call's files landed in")
    p.add_argument("-o", "--out", required=True)
    p.set_defaults(func=join)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
