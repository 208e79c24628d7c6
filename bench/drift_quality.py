"""How good is normd's BatchNorm drift signal? Detection rate, delay and false alarms on
corrupted digits, beside a per-feature Kolmogorov-Smirnov test on the inputs.

The digits model (64 -> 128 -> BatchNorm1d -> ReLU -> 64 -> BatchNorm1d -> ReLU -> 10) is
trained through normd on scikit-learn's digits (the split of tests/client/digits_test.py) and
served in eval mode with batches of 32 drawn from the test split, clean or corrupted (Gaussian
noise, contrast, brightness shift, blur, pixel dropout; 5 severities each, applied to the raw
0..16 pixels before the deployed standardisation). For every batch the benchmark sends one eval
Forward and reads the layers' eval-mode mean shift and variance log-ratio from GetModel (the
figures /metrics exports). It reports:

- AUROC of clean vs corrupted batches, per corruption and severity, per layer and figure, for
  the best single figure and for a combination (the largest clean-z-score of the four figures),
  and for the KS test (score: -log10 of the smallest per-feature p-value);
- detection delay after a shift starts, in batches: the shipped alert (deploy/prometheus/
  alerts.yml, NormdInputDrift: the eval-mode mean shift averaged over 5 minutes > 1 for 10
  minutes), evaluated per batch at a stated traffic of one batch per second (a window of 300
  batches, `for` 600), the same with threshold 0.5, and per-batch detectors (one batch's mean
  shift > 1; KS with a Bonferroni correction over the 64 pixels at alpha 0.05);
- false alarms on clean traffic as the expected run time (batches between alarms) over a long
  clean stream;
- the model's accuracy per corruption and severity.

The long streams (detection delay, false alarms) draw batch figures with replacement from the
figures measured on the server for that traffic. Seeds are fixed.

Usage: /usr/bin/python3 bench/drift_quality.py --build-dir build [--quick]
"""

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np
from scipy import ndimage, stats
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from normd_process import start_normd

BATCH = 32
RATE = 1.0  # batches per second: the stated traffic that turns the rule's minutes into batches
WINDOW, FOR = int(300 * RATE), int(600 * RATE)  # rate(...[5m]) and for: 10m
ALPHA = 0.05
SEVERITIES = {
    "gaussian noise": [0.5, 1.0, 2.0, 3.0, 4.0],    # sigma, pixel units (0..16)
    "contrast": [0.8, 0.6, 0.4, 0.3, 0.2],          # factor towards each image's mean
    "brightness": [1.0, 2.0, 3.0, 4.0, 6.0],        # added, clipped to 16
    "blur": [0.3, 0.5, 0.7, 1.0, 1.5],              # Gaussian sigma in pixels
    "pixel dropout": [0.05, 0.1, 0.2, 0.3, 0.5],    # fraction of pixels set to 0
}


def corrupt(x, kind, level, rng):
    img = x.reshape(-1, 8, 8).astype(np.float64)
    if kind == "gaussian noise":
        img = img + rng.normal(0.0, level, img.shape)
    elif kind == "contrast":
        mean = img.mean(axis=(1, 2), keepdims=True)
        img = mean + level * (img - mean)
    elif kind == "brightness":
        img = img + level
    elif kind == "blur":
        img = np.stack([ndimage.gaussian_filter(i, level, mode="constant") for i in img])
    elif kind == "pixel dropout":
        img = img * (rng.random(img.shape) >= level)
    return np.clip(img, 0.0, 16.0).reshape(len(x), 64)


def spec():
    return {"input_shape": [64],
            "layers": [{"name": "fc1", "linear": {"in_features": 64, "out_features": 128}},
                       {"name": "bn1", "batch_norm1d": {"num_features": 128}},
                       {"relu": {}},
                       {"name": "fc2", "linear": {"in_features": 128, "out_features": 64}},
                       {"name": "bn2", "batch_norm1d": {"num_features": 64}},
                       {"relu": {}},
                       {"name": "out", "linear": {"in_features": 64, "out_features": 10}}],
            "loss": "LOSS_CROSS_ENTROPY", "optimizer": {"adam": {"lr": 0.001}}, "seed": 0}


class Scorer:
    """Per-batch figures: the server's eval-mode drift per BatchNorm layer, and the KS test."""

    def __init__(self, client, mid, layers, reference, standardise):
        self.c, self.mid, self.layers = client, mid, layers
        self.ref = reference  # raw training pixels
        self.standardise = standardise

    def batch(self, raw):
        self.c.forward(self.mid, self.standardise(raw))
        status = {b.layer: b for b in self.c.get_model(self.mid).batch_norms}
        figures = []
        for layer in self.layers:
            figures += [status[layer].last_mean_shift, status[layer].last_var_log_ratio]
        pvalues = [stats.ks_2samp(self.ref[:, j], raw[:, j]).pvalue for j in range(64)]
        return figures, min(pvalues)

    def many(self, pool, n, rng):
        figs, pmins = [], []
        for _ in range(n):
            f, p = self.batch(pool[rng.integers(0, len(pool), BATCH)])
            figs.append(f)
            pmins.append(p)
        return np.array(figs), np.array(pmins)


def auroc(clean, shifted):
    return roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(shifted))], np.r_[clean, shifted])


def windowed_alarm(clean_stream, shifted_draw, threshold, window, hold, max_batches):
    """Batches after the shift starts until mean(last `window` scores) > threshold has held for
    `hold` consecutive batches (the rule with `for:`), the window starting full of clean
    traffic; None when it never fires within max_batches."""
    buf = list(clean_stream[-window:])
    total = float(sum(buf))
    held = 0
    for i in range(max_batches):
        s = shifted_draw(i)
        total += s - buf[i % window] if len(buf) == window else s
        buf[i % window] = s
        held = held + 1 if total / window > threshold else 0
        if held >= max(hold, 1):
            return i + 1
    return None


def alarms_in(stream, threshold, window, hold):
    """Alarm onsets in a stream of clean scores (the condition becoming true after being false
    for `hold` batches in a row)."""
    onsets, held, total = 0, 0, 0.0
    for i, s in enumerate(stream):
        total += s - (stream[i - window] if i >= window else 0.0)
        cond = i >= window - 1 and total / window > threshold
        held = held + 1 if cond else 0
        if held == max(hold, 1):
            onsets += 1
    return onsets


def fmt_delay(d, limit):
    return f"> {limit}" if d is None else str(d)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", default="build")
    ap.add_argument("--quick", action="store_true",
                    help="few batches, severity 5 only (the smoke test)")
    args = ap.parse_args()
    sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "client",
                                 "python"), os.path.join(args.build_dir, "client", "python")]
    import normd

    n_clean = 60 if args.quick else 1000   # measured clean batches
    n_shift = 30 if args.quick else 100    # measured batches per corruption and severity
    levels = [4] if args.quick else range(5)
    long_clean = 2000 if args.quick else 20000
    rng = np.random.default_rng(0)

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data.astype(np.float32), digits.target.astype(np.int64), test_size=0.2,
        random_state=0, stratify=digits.target)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std == 0] = 1.0

    def standardise(raw):
        return ((raw - mean) / std).astype(np.float32)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="normd-drift-") as tmp:
        proc, address = start_normd(args.build_dir, tmp,
                                    ["--metrics", "127.0.0.1:0", "--in-memory", "--log-level", "warn"])
        try:
            c = normd.Client(address)
            deadline = time.monotonic() + 30
            while c.health() != "SERVING" and time.monotonic() < deadline:
                time.sleep(0.05)
            mid = c.create_model(spec(), id="digits").id
            history = c.fit(mid, standardise(x_train), y_train, epochs=3 if args.quick else 15,
                            batch_size=BATCH, shuffle=True, seed=0, progress=False)
            c.set_mode(mid, "eval")
            layers = [b.layer for b in c.get_model(mid).batch_norms]
            names = [f"{l} {f}" for l in layers for f in ("shift", "varlog")]
            acc = c.evaluate(mid, standardise(x_test), labels=y_test).accuracy
            print(f"digits model trained through normd: {len(history)} epochs, test accuracy "
                  f"{100 * acc:.1f}%; layers {', '.join(layers)}; batches of {BATCH}")
            scorer = Scorer(c, mid, layers, x_train, standardise)
            clean_f, clean_p = scorer.many(x_test, n_clean, rng)
            ctrl_f, ctrl_p = scorer.many(x_test, n_shift, rng)
            results = {}
            for kind, sev in SEVERITIES.items():
                for s in levels:
                    pool = corrupt(x_test, kind, sev[s], rng)
                    a = c.evaluate(mid, standardise(pool), labels=y_test).accuracy
                    results[(kind, s + 1)] = (a,) + scorer.many(pool, n_shift, rng)
        finally:
            proc.terminate()
            proc.wait(10)

    # Combination: the largest clean z-score over the four figures.
    mu, sd = clean_f.mean(axis=0), clean_f.std(axis=0) + 1e-12

    def combined(f):
        return ((f - mu) / sd).max(axis=1)

    def ks_score(p):
        return -np.log10(np.maximum(p, 1e-300))

    print(f"\nAUROC, clean vs corrupted batches ({n_clean} clean, {n_shift} per row; control: "
          f"{n_shift} more clean batches)")
    header = ["corruption", "sev", "accuracy"] + names + ["best", "combined", "KS"]
    rows = []
    control = [auroc(clean_f[:, k], ctrl_f[:, k]) for k in range(len(names))]
    rows.append(["control (clean)", "-", f"{100 * acc:.1f}%"] + [f"{v:.3f}" for v in control] +
                [f"{max(control):.3f}", f"{auroc(combined(clean_f), combined(ctrl_f)):.3f}",
                 f"{auroc(ks_score(clean_p), ks_score(ctrl_p)):.3f}"])
    summary = {}
    for (kind, s), (a, f, p) in results.items():
        per = [auroc(clean_f[:, k], f[:, k]) for k in range(len(names))]
        comb = auroc(combined(clean_f), combined(f))
        ks = auroc(ks_score(clean_p), ks_score(p))
        summary[(kind, s)] = (max(per), comb, ks)
        rows.append([kind, str(s), f"{100 * a:.1f}%"] + [f"{v:.3f}" for v in per] +
                    [f"{max(per):.3f}", f"{comb:.3f}", f"{ks:.3f}"])
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(v).rjust(w) for v, w in zip(r, widths)))

    # Detection delay and false alarms. Scores: bn1's eval mean shift (what the rule averages;
    # the rule fires on any layer, so the larger of the layers' delays is not what counts: the
    # first layer to fire is).
    shift_cols = [2 * i for i in range(len(layers))]
    clean_stream_idx = rng.integers(0, len(clean_f), long_clean)
    clean_scores = clean_f[clean_stream_idx][:, shift_cols]
    clean_ks = clean_p[clean_stream_idx] * 64 < ALPHA
    max_batches = 3000
    print(f"\nDetection delay in batches after the shift starts (one batch of {BATCH} per second; "
          f"'> {max_batches}': not within {max_batches}); rule = NormdInputDrift (5 min mean > 1, "
          f"for 10 min = window {WINDOW}, hold {FOR}), first layer to fire")
    dheader = ["corruption", "sev", "rule", "rule@0.5", "rule, no for:", "batch>1", "KS/batch"]
    drows = []
    for (kind, s), (a, f, p) in results.items():
        delays = {}
        for name, thr, window, hold in (("rule", 1.0, WINDOW, FOR), ("rule@0.5", 0.5, WINDOW, FOR),
                                        ("rule, no for:", 1.0, WINDOW, 1),
                                        ("batch>1", 1.0, 1, 1)):
            per_layer = []
            for li, col in enumerate(shift_cols):
                draws = rng.integers(0, len(f), max_batches)
                per_layer.append(windowed_alarm(clean_scores[:, li], lambda i: f[draws[i], col],
                                                thr, window, hold, max_batches))
            fired = [d for d in per_layer if d is not None]
            delays[name] = min(fired) if fired else None
        draws = rng.integers(0, len(p), max_batches)
        hits = np.nonzero(p[draws] * 64 < ALPHA)[0]
        delays["KS/batch"] = int(hits[0]) + 1 if len(hits) else None
        drows.append([kind, str(s)] + [fmt_delay(delays[k], max_batches) for k in dheader[2:]])
    widths = [max(len(str(r[i])) for r in drows + [dheader]) for i in range(len(dheader))]
    for r in [dheader] + drows:
        print("  ".join(str(v).rjust(w) for v, w in zip(r, widths)))

    print(f"\nFalse alarms on clean traffic: expected run time (batches between alarms) over "
          f"{long_clean} clean batches")
    for name, thr, window, hold in (("rule", 1.0, WINDOW, FOR), ("rule@0.5", 0.5, WINDOW, FOR),
                                    ("rule, no for:", 1.0, WINDOW, 1), ("batch>1", 1.0, 1, 1)):
        n = sum(alarms_in(list(clean_scores[:, li]), thr, window, hold)
                for li in range(len(layers)))
        ert = f"> {long_clean}" if n == 0 else f"{long_clean / n:.0f}"
        print(f"  {name:<14} {n:>5} alarms  ERT {ert}")
    n = int(clean_ks.sum())
    print(f"  {'KS/batch':<14} {n:>5} alarms  ERT "
          f"{'> %d' % long_clean if n == 0 else '%.0f' % (long_clean / n)}")
    print(f"\n(max clean windowed mean over {WINDOW} batches: "
          f"{max(np.convolve(clean_scores[:, li], np.ones(WINDOW) / WINDOW, 'valid').max() for li in range(len(layers))):.3f};"
          f" {time.monotonic() - started:.0f} s in all)")

    # The smoke test's check: the strongest corruption is told from clean traffic better than
    # clean traffic is told from itself.
    strongest = max(summary.values(), key=lambda v: v[1])
    ok = all(0.0 <= v <= 1.0 for vals in summary.values() for v in vals) and \
        strongest[1] > auroc(combined(clean_f), combined(ctrl_f))
    print("drift_quality:", "ok" if ok else "FAILED: no corruption beats the clean control")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
