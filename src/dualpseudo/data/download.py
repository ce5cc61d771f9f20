"""Make sure the Fashion-MNIST files are present: Debian's package, else the official URLs, checked by sha256.

Run as `python -m dualpseudo.data.download [DEST]`. Only this explicit step touches the network; nothing at
run time does.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

APT_ROOT = Path("/usr/share/datasets/fashion-mnist")
BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# sha256 of the uncompressed files (gzip bytes differ between mirrors; the content must not).
FILES = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


def verified(root: Path) -> bool:
    """True when all four files exist in `root` (gzipped or not) with the expected content."""
    for stem, digest in FILES.items():
        path = root / f"{stem}.gz" if (root / f"{stem}.gz").is_file() else root / stem
        if not path.is_file():
            return False
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        except (OSError, EOFError):
            return False
        if hashlib.sha256(raw).hexdigest() != digest:
            return False
    return True


def ensure_fashion_mnist(dest: Path) -> Path:
    """Return a folder with verified Fashion-MNIST files, trying apt, then a download into `dest`."""
    if verified(APT_ROOT):
        return APT_ROOT
    if verified(dest):
        return dest
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        print("installing Debian package dataset-fashion-mnist ...", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"], check=False)
        if verified(APT_ROOT):
            return APT_ROOT
    dest.mkdir(parents=True, exist_ok=True)
    try:
        for stem in FILES:
            print(f"downloading {BASE_URL}{stem}.gz", flush=True)
            with urllib.request.urlopen(f"{BASE_URL}{stem}.gz", timeout=60) as r:
                (dest / f"{stem}.gz").write_bytes(r.read())
    except OSError as e:
        print(f"download failed ({e})", file=sys.stderr)
    if verified(dest):
        return dest
    names = ", ".join(f"{s}.gz" for s in FILES)
    raise SystemExit(f"error: Fashion-MNIST not found. Put {names} into {dest} (or {APT_ROOT}); "
                     f"they are at {BASE_URL}")


if __name__ == "__main__":
    print(ensure_fashion_mnist(Path(sys.argv[1] if len(sys.argv) > 1 else "data/fashion-mnist")))
