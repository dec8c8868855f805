"""`make demo`: the whole chain offline, on a corpus clipbeam draws itself.

synth-corpus -> embed (shipped shapes-clip) -> index -> search -> classify
(24 labels) -> generate (shipped shapes VQGAN) -> a gallery (HTML page and PNG
contact sheet). Every step is the real `clipbeam` command, printed before it
runs, so the same lines work on your own corpus with a real pretrained model.

    python -m clipbeam.demo --output demo-output [--n 960] [--steps 60]
"""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import sys
import time

import numpy as np
import pyarrow.parquet as pq

from clipbeam.cli import main as clipbeam
from clipbeam.gallery import Classification, Gallery, Hit, RenderPanel, SearchPanel, write_gallery
from clipbeam.models.shapes import class_prompts
from clipbeam.models.vqgan_clip import RenderSettings

QUERIES = ("a red circle", "a blue star", "a yellow triangle")
RENDER_PROMPTS = tuple(class_prompts())  # all 24 "a {color} {shape}"
# The loop's settings for the demo's renders (benchmarks/render_judges.py uses them too; measured there, see
# docs/renders.md): large Adam steps, cutouts that keep the picture recognisable to the small shapes CLIP (no
# noise or color jitter; "shrink" shows the whole image smaller over gray), and a softmax against the other
# 23 classes instead of a distance to one prompt alone.
DEMO_STEPS = 60
DEMO_SETTINGS = RenderSettings(cutn=16, lr=1.0, augment=("flip", "affine", "perspective", "shrink"),
                               augment_scale=1.5, contrast=RENDER_PROMPTS)


def step(*args: str, ok=(0,)) -> None:
    """Run one clipbeam command in this process, echoing it; stop the demo if it fails."""
    print(f"\n$ clipbeam {shlex.join(args)}", flush=True)
    code = clipbeam(list(args))
    if code not in ok:
        sys.exit(f"demo: `clipbeam {args[0]}` failed with exit code {code}")


def corpus_images(pattern: str) -> dict:
    """id -> PIL image for every sample of the demo corpus (ids as embed makes them)."""
    import io

    from PIL import Image

    from clipbeam.corpus.plan import plan_parts
    from clipbeam.corpus.read import read_part

    images = {}
    for index, part in enumerate(plan_parts([pattern])):
        for sample in read_part(index, part, None):
            if "image" in sample:
                images[sample["id"]] = Image.open(io.BytesIO(sample["image"])).convert("RGB")
    return images


def search(index_dir: str, images: dict, queries: list[str], k: int) -> list[list[Hit]]:
    """The top-k hits of each text query in the demo's index (shipped shapes-clip)."""
    from clipbeam.index import ShardedIndex
    from clipbeam.models.clip import ClipSpec, encode_texts, load_clip

    index = ShardedIndex.open(index_dir)
    clip = load_clip(ClipSpec("shapes-clip", "shapes", device="cpu"))
    scores, ids = index.search(encode_texts(clip, queries), k=k)
    out = []
    for row_scores, row_ids in zip(scores, ids, strict=True):
        rows = index.lookup(row_ids)
        out.append([Hit(rank + 1, float(score), row["id"], row.get("caption"), images[row["id"]])
                    for rank, (score, row) in enumerate(zip(row_scores, rows, strict=True))])
    return out


def search_panels(index_dir: str, images: dict) -> list[SearchPanel]:
    panels = []
    for query, hits in zip(QUERIES, search(index_dir, images, list(QUERIES), k=10), strict=True):
        precision = sum(hit.caption == query for hit in hits) / len(hits)
        panels.append(SearchPanel(query, hits, precision))
    return panels


def classification(classes_dir: str, embeddings_dir: str, labels: list[str]) -> Classification:
    predicted = {}
    for path in sorted(glob.glob(os.path.join(classes_dir, "labels", "*.parquet"))):
        for row in pq.read_table(path, columns=["id", "label"]).to_pylist():
            predicted[row["id"]] = row["label"]
    truth = {}
    for path in sorted(glob.glob(os.path.join(embeddings_dir, "embeddings", "*.parquet"))):
        for row in pq.read_table(path, columns=["id", "caption"]).to_pylist():
            truth[row["id"]] = row["caption"].removeprefix("a ")
    position = {label: i for i, label in enumerate(labels)}
    confusion = np.zeros((len(labels), len(labels)), dtype=int)
    for sample_id, label in truth.items():
        confusion[position[label], position[predicted[sample_id]]] += 1
    accuracy = float(np.trace(confusion) / confusion.sum())
    return Classification(labels, confusion, accuracy, int(confusion.sum()))


def renders(renders_dir: str, index_dir: str, images: dict) -> tuple[list[RenderPanel], list]:
    """Each render with both judges' verdicts and the top search hit for its prompt."""
    from PIL import Image

    from clipbeam.models.render_judges import judge_renders, load_judge_clip

    table = sorted(pq.read_table(os.path.join(renders_dir, "renders.parquet")).to_pylist(), key=lambda r: r["path"])
    pictures = [Image.open(os.path.join(renders_dir, r["path"])).convert("RGB") for r in table]
    prompts = [r["prompt"] for r in table]
    judgements = judge_renders(prompts, [np.asarray(p) for p in pictures], load_judge_clip())
    hits = search(index_dir, images, prompts, k=1)
    panels = [RenderPanel(r["prompt"], r["seed"], picture, r.get("clip_similarity"), verdicts(j), hit[0])
              for r, picture, j, hit in zip(table, pictures, judgements, hits, strict=True)]
    return panels, judgements


def verdicts(j) -> list[str]:
    mark = {True: "ok", False: "WRONG"}
    return [f"shape (model-free): {j.measured_shape or 'none'} {mark[j.measured_shape == j.shape]}",
            f"shape (judge CLIP): {j.clip_shape} {mark[j.clip_shape == j.shape]}",
            f"color: {j.measured_color or 'none'} {mark[j.color_right]}"]


def generate_flags(steps: int, settings: RenderSettings, contrast_file: str) -> list[str]:
    """`clipbeam generate` loop flags for the demo's settings (the contrast texts are in `contrast_file`)."""
    assert settings.contrast == RENDER_PROMPTS, "the demo's contrast texts are its prompts file"
    return ["--steps", str(steps), "--contrast", contrast_file, "--contrast-weight", str(settings.contrast_weight),
            "--cutn", str(settings.cutn), "--lr", str(settings.lr),
            "--augment", ",".join(settings.augment) or "none", "--noise-fac", str(settings.noise_fac),
            "--init", settings.init, "--tv-weight", str(settings.tv_weight), "--lr-schedule", settings.lr_schedule,
            "--augment-scale", str(settings.augment_scale)]


def run_demo(out: str, n: int, steps: int) -> tuple[str, str]:
    from clipbeam.models.shapes import class_names

    started = time.monotonic()
    os.makedirs(out, exist_ok=True)
    corpus, emb, idx = (os.path.join(out, name) for name in ("corpus", "embeddings", "index"))
    classes, rendered = os.path.join(out, "classes"), os.path.join(out, "renders")
    labels = [f"{color} {shape}" for color, shape in class_names()]
    with open(os.path.join(out, "labels.txt"), "w") as handle:
        handle.write("\n".join(labels) + "\n")
    with open(os.path.join(out, "prompts.txt"), "w") as handle:
        handle.write("\n".join(RENDER_PROMPTS) + "\n")
    print("clipbeam demo: models are the small ones shipped in clipbeam/assets (see MODELS.md), "
          "trained offline on this synthetic world; for real photos use a real pretrained model.")

    step("synth-corpus", "--output", corpus, "--n", str(n), "--seed", "2026", "--shard-size", str(max(n // 4, 1)))
    pattern = os.path.join(corpus, "*.tar")
    step("embed", "--input", pattern, "--output", emb, "--model", "shapes-clip", "--pretrained", "shapes",
         "--batch-size", "64", "--dtype", "float32")
    step("index", "--embeddings", emb, "--output", idx, "--shards", "2")
    step("search", "--index", idx, "--text", QUERIES[0], "-k", "5")
    step("classify", "--embeddings", emb, "--labels-file", os.path.join(out, "labels.txt"),
         "--template", "a {}", "--output", classes, "--top-k", "3")
    step("generate", "--prompts", os.path.join(out, "prompts.txt"), "--seeds", "0", "--vqgan", "shapes",
         "--model", "shapes-clip", "--pretrained", "shapes", "--size", "64", "64",
         *generate_flags(steps, DEMO_SETTINGS, os.path.join(out, "prompts.txt")), "--output", rendered)

    images = corpus_images(pattern)
    render_panels, judgements = renders(rendered, idx, images)
    gallery = Gallery(
        title="clipbeam demo: shapes",
        notes=[f"{len(images)} synthetic images (synth-corpus --n {n}), embedded with the shipped shapes-clip, "
               f"indexed in 2 shards, classified zero-shot over {len(labels)} labels, and {len(RENDER_PROMPTS)} "
               f"prompts rendered with the shipped shapes VQGAN ({steps} steps)."],
        searches=search_panels(idx, images),
        classification=classification(classes, emb, labels),
        renders=render_panels,
    )
    page, sheet = write_gallery(gallery, os.path.join(out, "gallery"))
    seconds = time.monotonic() - started
    print(f"\nclipbeam demo: done in {seconds:.0f} s")
    print(f"  zero-shot accuracy  {gallery.classification.accuracy:.3f} over {gallery.classification.samples} images")
    for panel in gallery.searches:
        print(f"  search {panel.query!r:22} precision@10 {panel.precision:.2f}")
    print(f"  renders             shape right by both judges {sum(j.shape_right for j in judgements)}"
          f"/{len(judgements)}, color right {sum(j.color_right for j in judgements)}/{len(judgements)}")
    print(f"  gallery page        {page}")
    print(f"  contact sheet       {sheet}")
    print(f"\nSearch the index from a browser (http://127.0.0.1:8765/, or `make serve`):\n"
          f"  clipbeam serve --index {shlex.quote(idx)}")
    return page, sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipbeam.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo-output", help="folder for everything the demo writes")
    parser.add_argument("--n", type=int, default=960, help="corpus size (default %(default)s)")
    parser.add_argument("--steps", type=int, default=DEMO_STEPS,
                        help="VQGAN+CLIP steps per render (default %(default)s)")
    args = parser.parse_args(argv)
    run_demo(os.path.abspath(args.output), args.n, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
