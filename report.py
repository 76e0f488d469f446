"""report.py: what train.py reports. The baseline row a Transformer has to beat, LoRA's hypothesis measured on the
runs' updates (Hu et al. §7), the plots, and OUT/report.md + report.json (train.py scores the runs themselves).
"""
import collections
import json
import time
from pathlib import Path

import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped
from safetensors.torch import load_file
from torch import Tensor

import hf_lora
import lora
from data import Dataset, majority

BASELINE_C = (0.1, 0.3, 1.0, 3.0)  # the linear SVM's inverse regularisation, chosen on the validation split
RANKS = (1, 2, 4, 6, 16, 64)  # top-r directions whose share of the update's energy the report gives

def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

def run_folder(task: str, name: str) -> str:
    """Where a run's files go in OUT: sentiment's in runs/, another task's in runs/<task>/."""
    return f"runs/{name}" if task == "sentiment" else f"runs/{task}/{name}"

def baseline(data: Dataset, task: str) -> dict:
    """The classic row a Transformer has to beat. Classification: character 1-3-gram TF-IDF + a linear SVM, C chosen
    on validation. Tagging: each character's most frequent tag in training (unseen ones: the commonest tag)."""
    from sklearn.metrics import accuracy_score, f1_score  # the macro-F1 of train.metrics, as the tests show
    began = time.perf_counter()
    if task == "tagging":
        counts = collections.defaultdict(collections.Counter)
        for text, tags in data.train:
            for ch, tag in zip(text, tags):
                counts[ch][tag] += 1
        commonest = sum(counts.values(), collections.Counter()).most_common(1)[0][0]
        lookup = {ch: c.most_common(1)[0][0] for ch, c in counts.items()}
        labels = [tag for _, tags in data.test for tag in tags]
        predicted = [lookup.get(ch, commonest) for text, _ in data.test for ch in text]
        n_params, extra = len(lookup), {}
    else:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.svm import LinearSVC
        tfidf = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True)
        (x, y), (val_x, val_y), (test_x, labels) = (zip(*split) for split in (data.train, data.val, data.test))
        x, val_x = tfidf.fit_transform(x), tfidf.transform(val_x)
        best = max((LinearSVC(C=c, random_state=0).fit(x, y) for c in BASELINE_C), key=lambda m: m.score(val_x, val_y))
        predicted = best.predict(tfidf.transform(test_x))
        n_params, extra = best.coef_.size + best.intercept_.size, {"C": best.C}
    return {"run": "baseline", "task": task, "trainable_params": n_params, "total_params": n_params,
            "trainable_share": 1.0, "train_seconds": round(time.perf_counter() - began, 2), "test_loss": None,
            "epochs": None, "test_accuracy": float(accuracy_score(labels, predicted)),
            "test_macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)), "steps": None,
            "lr": None, "batch_size": None} | extra

# --- LoRA's hypothesis (Hu et al. §7), measured on this run: is the update a task needs of low rank? ---------------
@jaxtyped(typechecker=beartype)
def energy_share(update: Float[Tensor, "d_out d_in"], ranks: tuple[int, ...]) -> list[float]:
    """Share of ||dW||_F^2 held by dW's top r singular directions, for each r (1.0 once r >= rank dW)."""
    energy = torch.linalg.svdvals(update.double()).square()
    return [float(energy[:r].sum() / energy.sum()) for r in ranks]

@jaxtyped(typechecker=beartype)
def subspace_similarity(u: Float[Tensor, "d i"], v: Float[Tensor, "d j"]) -> float:
    """phi = ||U^T V||_F^2 / min(i, j) of two orthonormal bases (§7.2): 1 when one span holds the other, 0 orthogonal;
    random subspaces give about max(i, j) / d."""
    return float((u.double().T @ v.double()).square().sum() / min(u.shape[1], v.shape[1]))

@jaxtyped(typechecker=beartype)
def amplification(update: Float[Tensor, "d_out d_in"], w0: Float[Tensor, "d_out d_in"], r: int) -> float:
    """||dW||_F / ||U_r^T W0 V_r||_F with U_r, V_r dW's top-r singular vectors (§7.3): above 1 when the update
    amplifies directions along which W0 itself is small."""
    u, _, vh = torch.linalg.svd(update.double())
    return float(update.double().norm() / (u[:, :r].T @ w0.double() @ vh[:r].T).norm())

def hypothesis(base: str, full: Path, lora_adapter: Path, wide: Path | None = None) -> dict:
    """Per adapted matrix X: the energy of full fine-tuning's dW = W_full - W0 in its top r directions, phi between
    the lora run's update s B@A and full's top-r directions (r = lora's rank), and both updates' amplification; with
    lora_wide's weights, phi(i, j) between the top i directions of lora's A and the top j of lora_wide's."""
    _, w0 = hf_lora.load_bert(base)
    full_weights = load_file(full)
    adapters, cfg = hf_lora.adapters_from_peft(lora_adapter)
    wide_adapters = load_file(wide) if wide else {}
    ranks = tuple(sorted({*RANKS, cfg.r}))
    measures = {}
    for x in sorted({k.rpartition(".")[0] for k in adapters if ".lora_" in k}):
        w = w0[f"{x}.weight"].double()
        full_update = full_weights[f"{x}.weight"].double() - w
        lora_update = lora.delta(adapters[f"{x}.lora_A"], adapters[f"{x}.lora_B"], cfg.scale)
        top = [torch.linalg.svd(d.double())[0][:, : cfg.r] for d in (full_update, lora_update)]
        measures[x] = {"energy_share": dict(zip(map(str, ranks), energy_share(full_update, ranks))),
                       "phi_lora_full": subspace_similarity(*top), "phi_random": cfg.r / w.shape[0],
                       "amplification_full": amplification(full_update, w, cfg.r),
                       "amplification_lora": amplification(lora_update, w, cfg.r)}
        if wide_adapters:  # right-singular vectors of each A, as columns
            a, b = (torch.linalg.svd(m[f"{x}.lora_A"].double(), full_matrices=False)[2].T for m in (adapters,
                                                                                                  wide_adapters))
            measures[x]["phi_lora_wide"] = [[subspace_similarity(a[:, :i], b[:, :j]) for j in range(1, b.shape[1] + 1)]
                                            for i in range(1, a.shape[1] + 1)]
    return measures

def mean_over(measures: dict, value, kind: str = "") -> float:
    """The mean of value(m) over the adapted matrices (those of one module kind, e.g. "attn.q", when given)."""
    values = [value(m) for x, m in measures.items() if x.endswith(kind)]
    return sum(values) / len(values)

def plot_hypothesis(path: Path, measures: dict, r: int) -> None:
    """Energy share of full's dW against r and phi(LoRA, full) per module kind (means over layers); with lora_wide,
    phi(i, j) between the two LoRA ranks' top directions (the paper's Figure 3, mean over the matrices)."""
    from matplotlib.figure import Figure  # imported when used: matplotlib costs memory the rows report
    kinds = sorted({x.split(".", 2)[2] for x in measures})  # layers.0.attn.q -> attn.q
    grids = [m["phi_lora_wide"] for m in measures.values() if "phi_lora_wide" in m]
    fig = Figure(figsize=(16 if grids else 11, 4.5))
    left, right, *third = fig.subplots(1, 3 if grids else 2)
    for kind in kinds:
        shares = [mean_over(measures, lambda m: m["energy_share"][str(k)], "." + kind) for k in RANKS]
        left.plot(RANKS, shares, marker="o", label=kind)
    left.axvline(r, color="gray", linestyle=":", label=f"LoRA's r = {r}")
    left.set(xscale="log", xticks=RANKS, xticklabels=RANKS, xlabel="top-r singular directions of full fine-tuning's "
             "dW", ylabel="share of ||dW||_F^2 (mean over layers)", title="Is full fine-tuning's update low-rank?")
    left.legend()
    for key, label, alpha in (("phi_lora_full", "LoRA vs full", 1.0), ("phi_random", "random subspaces", 0.6)):
        means = [mean_over(measures, lambda m: m[key], "." + kind) for kind in kinds]
        right.bar(kinds, means, label=label, alpha=alpha)
    right.set(ylim=(0, 1), ylabel=f"phi, top {r} directions", title="Does LoRA find full fine-tuning's directions?")
    right.legend()
    if grids:
        grid = torch.tensor(grids).mean(0)  # (r, WIDE r)
        image = third[0].imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower",
                                extent=(0.5, grid.shape[1] + 0.5, 0.5, grid.shape[0] + 0.5))
        third[0].set(xlabel=f"top j directions of LoRA r={grid.shape[1]}", ylabel=f"top i directions of LoRA r={r}",
                     title="phi(i, j) between two LoRA ranks (Hu Fig. 3)")
        fig.colorbar(image, ax=third[0])
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")

def hypothesis_line(measures: dict, task: str, r: int) -> str:
    """The report's sentence on LoRA's hypothesis: means over the adapted matrices."""
    mean = {key: mean_over(measures, lambda m: m[key]) for key in ("phi_lora_full", "phi_random",
                                                                    "amplification_lora", "amplification_full")}
    line = (f"LoRA's hypothesis (Hu et al. §7; {task}; hypothesis.png; means over the {len(measures)} adapted "
            f"matrices): full fine-tuning's dW holds {mean_over(measures, lambda m: m['energy_share'][str(r)]):.0%} "
            f"of its energy in its top {r} directions; phi(LoRA's update, full's top {r}) = {mean['phi_lora_full']:.2f}"
            f" (random subspaces: {mean['phi_random']:.2f}); amplification factor LoRA "
            f"{mean['amplification_lora']:.1f}, full {mean['amplification_full']:.1f}")
    grids = torch.tensor([m["phi_lora_wide"] for m in measures.values() if "phi_lora_wide" in m])
    if len(grids):  # (matrices, r, WIDE r)
        phi, wide = grids.mean(0), grids.shape[2]
        line += f"; phi(top i of LoRA r={r}, top j of r={wide}): i = j = 1 {phi[0, 0]:.2f}, i = {r}, j = {wide} " \
                f"{phi[r - 1, wide - 1]:.2f}"
    return line

def plot(path: Path, series: dict, ylabel: str, title: str, smooth: int = 1) -> None:
    """Lines {label: losses} against the optimiser step, each a moving average over up to `smooth` steps."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for label, y in series.items():
        k = max(1, min(smooth, len(y) // 10))
        dashed = "peft" in label.lower()
        ax.plot(range(k, len(y) + 1), torch.tensor(y).unfold(0, k, 1).mean(1), label=label,
                linestyle="--" if dashed else "-", linewidth=1 if dashed else 2)
    ax.set(xlabel="optimiser step", ylabel=ylabel, title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")

# --- report.md and report.json --------------------------------------------------------------------------------------
def write_report(job, plan: dict, tasks: dict, stages: dict, base: str) -> None:
    """report.md, report.json and the plots, written through job.out; tasks: {task: (data, results, rows)}, of which
    the first is plotted and measured. base: the base's folder or HuggingFace name."""
    task, (data, results, _) = next(iter(tasks.items()))
    root = job.out.root
    hardware = {"precision": plan["precision"], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "threads": torch.get_num_threads(), "torch": torch.__version__}
    device = torch.cuda.get_device_name(job.device) if job.device.type == "cuda" else "CPU"
    machine = (f"{device} (capability {hardware['cpu_capability']}), {hardware['threads']} torch threads, torch "
               f"{hardware['torch']}, world size {job.world}, precision {hardware['precision']}")
    memory = ("CUDA max_memory_allocated during the run" if job.device.type == "cuda" else "the process's peak "
              "resident set (ru_maxrss) at the row's end, earlier stages included; bench.py measures each run alone")
    setting = [f"{t}: {d.notes}; train {len(d.train):,} / validation {len(d.val):,} / test {len(d.test):,}; "
               f"{len(d.label_names)} classes{'' if len(d.label_names) > 10 else f' {d.label_names}'}"
               for t, (d, _, _) in tasks.items()]
    setting += [f"base of lora/peft/head/full: {base or 'the packaged MiniLM-L6'}", f"machine: {machine}",
                f"peak memory: {memory}"]
    findings = []  # report.md lists them after the setting, the console after the tables
    losses = {f"{t} {k}" if len(tasks) > 1 else k: r["losses"] for t, (_, rs, _) in tasks.items()
              for k, r in rs.items()}
    files = {"curves.png": lambda path: plot(path, losses, "training loss (moving average)", "training", 25)}
    gap = None
    if "lora" in results and "peft" in results:
        ours, theirs = results["lora"], results["peft"]
        gap = {"max_abs_loss_diff": max(abs(a - b) for a, b in zip(ours["losses"], theirs["losses"])),
               "steps": len(ours["losses"]),
               "test_accuracy_diff": abs(ours["row"]["test_accuracy"] - theirs["row"]["test_accuracy"])}
        theirs["row"]["max_abs_loss_diff_vs_lora"] = gap["max_abs_loss_diff"]
        findings.append(f"our LoRA vs PEFT's ({task}; same base, init, batches and optimiser, dropout 0): largest "
                        f"|loss difference| {gap['max_abs_loss_diff']:.2e} over {gap['steps']} steps; test accuracy "
                        f"difference {gap['test_accuracy_diff']:.2e}")
        pair = {"ours: nanollm + lora.py": ours["losses"], "PEFT: transformers + peft": theirs["losses"]}
        files["lora_vs_peft.png"] = lambda path: plot(path, pair, "training loss per batch",
                                                      "same base, adapter init, batches and optimiser")
    measures = {}
    if "full" in results and "lora" in results:  # from the two runs' files, just written
        wide = root / run_folder(task, "lora_wide") / "model.safetensors" if "lora_wide" in results else None
        measures = hypothesis(base, root / run_folder(task, "full") / "model.safetensors",
                              root / run_folder(task, "lora") / "adapter", wide)
        findings.append(hypothesis_line(measures, task, plan["lora_r"]))
        files["hypothesis.png"] = lambda path: plot_hypothesis(path, measures, plan["lora_r"])
    if base == str(root / "base") and "base/pretrain.json" in job.out.files:
        pretrain = json.loads((root / "base" / "pretrain.json").read_text())["losses"]
        title = f"pretraining on People's Daily 1998 + the training texts of {Path(data.source).name}"
        series = {"masked-LM + bag of characters": pretrain}
        files["pretrain.png"] = lambda path: plot(path, series, "loss (moving average)", title, 50)
    tables = []
    report = {"rows": [], "tasks": {}}
    for t, (d, rs, rows) in tasks.items():
        top, count, n = majority(d)
        at_majority = [row["run"] for row in rows if round(row["test_accuracy"] * n) == count]
        if at_majority:
            findings.append(f"{', '.join(at_majority)}: test accuracy is the majority-class rate ({count / n:.2%}: "
                            f"as if always answering '{top}'); that row learned nothing usable")
        if len(tasks) > 1:
            tables += [f"### {t}", ""]
        tables += ["| run | trainable params | share | epochs | train s | peak memory MB | test accuracy | macro-F1 |",
                   "|---|---:|---:|---:|---:|---:|---:|---:|"]
        tables += [f"| {r['run']} | {r['trainable_params']:,} | {r['trainable_share']:.2%} | {r['epochs'] or '-'} | "
                   f"{r['train_seconds']:.0f} | {r['peak_memory_mb']:.0f} | {r['test_accuracy']:.2%} | "
                   f"{r['test_macro_f1']:.2%} |" for r in rows] + [""]
        report["rows"] += rows
        report["tasks"][t] = {"data": d.notes, "majority_rate": count / n, "at_majority_rate": at_majority,
                              "splits": {k: len(getattr(d, k)) for k in ("train", "val", "test")},
                              "label_names": d.label_names, "val": {k: r["val"] for k, r in rs.items()},
                              "predictions": {k: r["predictions"] for k, r in rs.items()}}
    findings.append("wall time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()))
    report |= report["tasks"][task] | {"lora_vs_peft": gap, "hypothesis": measures, "stages_seconds": stages,
                                       "machine": machine, "memory_method": memory, "base": base, "plan": plan}
    report |= hardware
    markdown = "\n".join(["# nanollm: training report", ""] + [f"- {line}" for line in setting + findings] + [""]
                         + tables)
    files["report.md"] = lambda path: path.write_text(markdown, encoding="utf-8")
    files["report.json"] = lambda path: write_json(path, report)
    source = " ".join(run_folder(t, k) for t, (_, rs, _) in tasks.items() for k in rs)  # the runs reported
    for name, make in files.items():
        job.out.write(name, make, {"plan": plan}, source)
    print("\n" + "\n".join(tables + findings) + f"\nreport: {root / 'report.md'}")
