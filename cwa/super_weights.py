"""Super weights: found by one forward pass, proven by perturbation (`cwa superweights`).

Method (Yu et al. 2024, "The Super Weight in Large Language Models", arXiv:2411.07191)
-----------------------------------------------------------------------------------
A few single weights of an LLM's MLP down-projection create a *super activation*: a
massive value in one hidden channel that the residual stream carries through the rest of
the network; zeroing that one weight wrecks the model. The detector is data-free: feed one
short prompt (default "Apple Inc. is a worldwide tech company.", the paper's), hook the
input x [tokens, d_ff] and output y [tokens, d_model] of every block's down-projection
(`mlp.down_proj` in Llama, Mistral, OLMo, Phi-3; `mlp.c_proj` in GPT-2, a `Conv1D` stored
(in, out); `mlp.dense_4h_to_h` in GPT-NeoX/Pythia and Falcon; `fc2` in OPT; `--module` for
others), and in each layer take

- j = the input channel of the largest |x| (over every token and channel), and
- i = the output channel of the largest |y|;

the candidate is W[i, j] in nn.Linear's (out, in) layout — a weight that multiplies the
massive input into the massive output. In GPT-2's `Conv1D` the same weight is stored at
[j, i]; selections store it at its stored flat index.

Which layers: a layer is a candidate when its output spike is massive relative to that
layer's own activations: max|y| ≥ `spike_ratio` × median|y| over every token and channel
(default 100; Sun et al. 2024, "Massive Activations in LLMs", describe massive activations
as about 1000× the median), and, with `spike_threshold`, also max|y| ≥ that absolute value
(the paper's criterion: 50, on 7B models in float16). A per-layer ratio is scale-free, so
one default serves a 2-layer test model and an 8B model. When no layer qualifies, the
layer with the largest ratio is still tested, flagged `passed: false`, so every run shows
what the strongest spike of the model does. `all_layers` tests every layer's coordinate.

Proof: each candidate is zeroed alone (one draw of a `superweight` selection, one weight
each) and evaluated on the evaluation windows, against `draws` random single weights
(a `random_k` control of size 1, uniform over every entry of the same down-projection
matrices, from (seed, "control", d) like every random control) zeroed alone. Per candidate:
its ΔNLL with a paired bootstrap ci95 over windows, and against the controls the one-sided
p = (1 + #{controls ≥ candidate}) / (R + 1) and z = (candidate − mean) / std, as in the
perturb summary (one-sided: the candidate hurts more), and `kl_p_value`, the same on
KL(baseline ‖ zeroed) (the candidate changes the predictions more, whichever way the NLL
moves). It runs through the perturb stage (`cwa.stages.perturb_stage`), so the
numbers are those `cwa perturb CANDIDATES CONTROLS --perturb zero` computes.

Caveats: the detector looks at one prompt; the paper notes super activations appear for
any prompt (the strongest at the first tokens), but a model without them still yields one
candidate per layer — which the controls then show to be ordinary. One candidate per
layer: a layer holding several super weights (Llama-3-8B has three in layer 1, one input
channel) shows only the strongest until it is zeroed (the paper iterates; this does not).
Cost: one forward pass on the prompt, then 1 + candidates + R evaluation passes.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cwa.errors import UsageError

DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."
DEFAULT_SPIKE_RATIO = 100.0
#: Module types (`cwa.artifacts.param_group`) that are an MLP's down-projection.
DOWN_PROJECTIONS = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc_out", "mlp.fc2", "fc2",
                    "mlp.w2", "feed_forward.w2")
#: Part of every fingerprint of this stage: a change of the detector is never a cache hit.
DETECT_VERSION = 1
KIND = "superweight"

PathLike = str | os.PathLike


# --------------------------------------------------------------------------- modules


@dataclass(frozen=True)
class DownProj:
    """One block's down-projection: its module, its weight's name and layout."""

    layer: int
    module: str
    param: str
    transposed: bool  # GPT-2 Conv1D: weight stored (in, out)
    n_in: int
    n_out: int

    def flat_index(self, row: int, col: int) -> int:
        """The stored flat index of W[row, col] in nn.Linear's (out, in) layout."""
        return col * self.n_out + row if self.transposed else row * self.n_in + col

    def stored_coords(self, row: int, col: int) -> tuple[int, int]:
        return (col, row) if self.transposed else (row, col)


def down_projections(model, module: str | None = None) -> list[DownProj]:
    """Every block's down-projection (`DOWN_PROJECTIONS`, or the module type `module`,
    e.g. "mlp.down_proj"), in block order; `nn.Linear` or GPT-2's `Conv1D`."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from cwa.artifacts import param_group

    wanted = (module,) if module else DOWN_PROJECTIONS
    out = []
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        block, typ = param_group(f"{name}.weight")
        if block is None or typ not in wanted:
            continue
        if isinstance(mod, Conv1D):
            out.append(DownProj(block, name, f"{name}.weight", True, int(w.shape[0]), int(w.shape[1])))
        elif isinstance(mod, torch.nn.Linear):
            out.append(DownProj(block, name, f"{name}.weight", False, int(w.shape[1]), int(w.shape[0])))
    if not out:
        looked = f"module type {module!r}" if module else ", ".join(DOWN_PROJECTIONS)
        raise UsageError(
            f"--module: no MLP down-projection (nn.Linear or Conv1D) found in this model (looked for {looked}); "
            "name its module type with --module, e.g. --module mlp.down_proj"
        )
    return sorted(out, key=lambda p: p.layer)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens as cwa's windows have them: BOS first when the tokenizer has
    one, no other special tokens. An empty prompt is the BOS token alone."""
    ids = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
    bos = tokenizer.bos_token_id
    if bos is not None:
        ids = [int(bos), *ids]
    if not ids:
        raise UsageError("--prompt '': this tokenizer has no BOS token; give a prompt")
    return [int(t) for t in ids]


# --------------------------------------------------------------------------- detector


@dataclass
class LayerSpike:
    """What one forward pass shows at one layer's down-projection (rows, cols in
    nn.Linear's layout; tokens are prompt positions)."""

    layer: int
    param: str
    row: int  # output channel of the largest |y|
    col: int  # input channel of the largest |x|
    out_max: float  # y at (out_token, row), signed
    out_token: int
    out_median: float  # median |y| over every token and channel
    ratio: float  # |out_max| / out_median
    in_max: float  # x at (in_token, col), signed
    in_token: int
    in_median: float
    weight: float  # W[row, col]
    share: float  # x[out_token, col] * W[row, col] / y[out_token, row]: the spike's part due to this weight
    passed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def detect(model, ids: list[int], projs: list[DownProj]) -> list[LayerSpike]:
    """One forward pass on `ids` with a hook on every down-projection (see the module
    docstring); one `LayerSpike` per layer."""
    import torch

    seen: dict[str, tuple[Any, Any]] = {}
    mods = dict(model.named_modules())

    def hook(name):
        def fn(_mod, inputs, output):
            seen[name] = (inputs[0].detach()[0].float().cpu(), output.detach()[0].float().cpu())
        return fn

    handles = [mods[p.module].register_forward_hook(hook(p.module)) for p in projs]
    try:
        dev = model.get_input_embeddings().weight.device
        with torch.inference_mode():
            model(torch.tensor([ids], device=dev))
    finally:
        for h in handles:
            h.remove()
    named = dict(model.named_parameters())
    return [_spike(p, *seen[p.module], named[p.param]) for p in projs]


def _spike(p: DownProj, x, y, weight) -> LayerSpike:
    import numpy as np

    xa, ya = x.abs(), y.abs()
    t_in, col = divmod(int(xa.argmax()), xa.shape[1])
    t_out, row = divmod(int(ya.argmax()), ya.shape[1])
    r, c = p.stored_coords(row, col)
    w = float(weight.detach()[r, c].float())
    med = float(np.median(ya.numpy().astype(np.float64)))
    out_max = float(y[t_out, row])
    with np.errstate(all="ignore"):
        ratio = float(np.float64(abs(out_max)) / np.float64(med))
        share = float(np.float64(float(x[t_out, col]) * w) / np.float64(out_max))
    return LayerSpike(p.layer, p.param, row, col, out_max, t_out, med, ratio, float(x[t_in, col]), t_in,
                      float(np.median(xa.numpy().astype(np.float64))), w, share)


def pick(spikes: list[LayerSpike], spike_ratio: float, spike_threshold: float | None,
         all_layers: bool) -> list[int]:
    """Indices of the candidate layers (sets `passed` on every spike): those that pass, or
    every layer with `all_layers`, or, when none passes, the layer of the largest ratio."""
    for s in spikes:
        s.passed = bool(s.ratio >= spike_ratio and (spike_threshold is None or abs(s.out_max) >= spike_threshold))
    if all_layers:
        return list(range(len(spikes)))
    chosen = [i for i, s in enumerate(spikes) if s.passed]
    if not chosen:
        ratios = [s.ratio if not math.isnan(s.ratio) else -math.inf for s in spikes]
        chosen = [max(range(len(spikes)), key=lambda i: ratios[i])]
    return chosen


def check_options(spike_ratio: float, spike_threshold: float | None, draws: int, seed: int):
    """`--spike-ratio`, `--spike-threshold`, `--control-draws`, `--seed`, checked."""
    from cwa import checks as C

    if not (isinstance(spike_ratio, (int, float)) and math.isfinite(spike_ratio) and spike_ratio > 0):
        raise UsageError(f"--spike-ratio {spike_ratio}: must be a positive number (a multiple of the median |activation|)")
    if spike_threshold is not None and not (
        isinstance(spike_threshold, (int, float)) and math.isfinite(spike_threshold) and spike_threshold >= 0
    ):
        raise UsageError(f"--spike-threshold {spike_threshold}: must be a finite number >= 0")
    return float(spike_ratio), None if spike_threshold is None else float(spike_threshold), \
        C.check_draws(draws), C.check_seed(seed)


# --------------------------------------------------------------------------- selections


class _WeightMagnitudes:
    """|w| of the down-projection weights, one tensor at a time: the population of the
    random single-weight controls and the score they record."""

    metric = "magnitude"

    def __init__(self, model, names: list[str]) -> None:
        self._named = dict(model.named_parameters())
        self.names = list(names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._named[name].shape)

    def get(self, name: str):
        return self._named[name].detach().abs().float().cpu()


def _provenance(lm, projs: list[DownProj], ids: list[int], prompt: str) -> dict[str, Any]:
    from cwa import __version__

    return {"model": lm.name, "model_fingerprint": lm.fingerprint, "metric": KIND, "scores": None,
            "scores_fingerprint": None, "prompt": prompt, "prompt_ids": ids,
            "shapes": {p.param: ([p.n_in, p.n_out] if p.transposed else [p.n_out, p.n_in]) for p in projs},
            "cwa_version": __version__}


def candidate_selection(lm, projs, spikes, chosen, ids, prompt, seed, fingerprint, options):
    """The `superweight` selection: one draw per candidate, one weight each (score: the
    output spike y, signed), so `cwa perturb` zeroes each alone."""
    import numpy as np

    from cwa.ranking import Draw, Selection

    index = {p.param: i for i, p in enumerate(projs)}
    draws, cands = [], []
    for d, li in enumerate(chosen):
        s, p = spikes[li], projs[li]
        fi = p.flat_index(s.row, s.col)
        draws.append(Draw(np.array([index[p.param]]), np.array([fi]), np.array([s.out_max])))
        cands.append({"draw": d, **s.to_dict(), "coords": ",".join(map(str, p.stored_coords(s.row, s.col))),
                      "flat_index": fi, "value": s.weight})
    info = {"n_population": int(sum(p.n_in * p.n_out for p in projs)),
            "per_tensor_counts": [d.counts(len(projs)).tolist() for d in draws],
            "candidates": cands, "layers": [s.to_dict() for s in spikes], "detector": options}
    sel = Selection(kind=KIND, k=1, mode="global", metric=KIND, rank_by="abs", seed=int(seed), ties_at_k=0,
                    params=[p.param for p in projs], draws=draws, info=info)
    sel.fingerprint, sel.provenance, sel.model = fingerprint, _provenance(lm, projs, ids, prompt), lm
    return sel


def control_selection(lm, cand, draws: int, seed: int, fingerprint: str):
    """R random single weights over the down-projection matrices (`random_k`, K = 1),
    with each draw's overlap with the candidates recorded."""
    from cwa.controls import make_control
    from cwa.ranking import Selection

    src = _WeightMagnitudes(lm.model, cand.params)
    ref = Selection(kind=KIND, k=1, mode="global", metric=KIND, rank_by="abs", seed=cand.seed, ties_at_k=0,
                    params=cand.params, draws=cand.draws[:1])
    ctl = make_control("random_k", src, ref, draws=draws, seed=seed)
    hit = {(int(d.param_index[0]), int(d.flat_index[0])) for d in cand.draws}
    ctl.info["overlap_with_candidates"] = [int(sum((int(a), int(b)) in hit for a, b in zip(d.param_index, d.flat_index,
                                                                                           strict=True)))
                                           for d in ctl.draws]
    ctl.info["population"] = "every entry of the down-projection weights"
    ctl.info["draw_seed"] = int(seed)
    ctl.metric, ctl.seed = KIND, cand.seed
    ctl.fingerprint = fingerprint
    ctl.provenance = {**cand.provenance, "ref": str(cand.path) if cand.path is not None else cand.fingerprint}
    ctl.model = lm
    return ctl


# --------------------------------------------------------------------------- proof


def compare(res, n_candidates: int) -> list[dict[str, Any]]:
    """Per candidate (the first `n_candidates` conditions of `res`): its ΔNLL, paired
    bootstrap ci95 over windows, KL, and against the random single-weight controls (the
    other conditions) the p-value and z of the perturb summary."""
    import numpy as np

    from cwa.perturbation import _draws_summary, paired_bootstrap_ci

    conds = res.conditions
    ctl = np.array([_delta(c) for c in conds[n_candidates:]], dtype=np.float64)
    ctl_kl = np.array([_num(c.get("kl_from_baseline")) for c in conds[n_candidates:]], dtype=np.float64)
    base = np.asarray(res.arrays["baseline/per_window_nll"], dtype=np.float64)
    out = []
    for i, c in enumerate(conds[:n_candidates]):
        delta = _delta(c)
        vs = _draws_summary(ctl, delta) if len(ctl) >= 2 else {}
        kl = _num(c.get("kl_from_baseline"))
        kl_p = (1 + int(np.sum((ctl_kl >= kl) | np.isnan(ctl_kl)))) / (len(ctl_kl) + 1) if not math.isnan(kl) else math.nan
        pw = np.asarray(res.arrays[f"conditions/{i}/per_window_nll"], dtype=np.float64)
        out.append({
            "condition": f"{KIND}:{i}" if n_candidates > 1 else KIND, "delta_nll": delta,
            "ci95": list(paired_bootstrap_ci(base, pw)), "kl_from_baseline": c.get("kl_from_baseline"),
            "n_changed": c.get("n_changed"), "p_value": vs.get("topk_p_value"), "z": vs.get("topk_z"),
            "kl_p_value": kl_p,
        })
    return out


def _delta(c: dict) -> float:
    return _num(c.get("delta_nll"))


def _num(v) -> float:
    """A recorded number (JSON may hold "nan"/"inf" strings, or null) as a float."""
    try:
        return math.nan if v is None else float(v)
    except (TypeError, ValueError):
        return math.nan


def _controls_summary(res, n_candidates: int) -> dict[str, Any]:
    import numpy as np

    d = np.array([_delta(c) for c in res.conditions[n_candidates:]], dtype=np.float64)
    with np.errstate(all="ignore"):
        return {"kind": "random_k", "k": 1, "n_draws": int(len(d)), "mean": float(np.mean(d)),
                "std": float(np.std(d, ddof=1)) if len(d) > 1 else math.nan,
                "ci95": [float(v) for v in np.percentile(d, [2.5, 97.5])],
                "max": float(np.max(d))}


# --------------------------------------------------------------------------- stage


@dataclass
class SuperWeights:
    """What `cwa superweights` found and proved: `candidates` (a `superweight`
    Selection, one draw per candidate), `controls` (the random single weights),
    `results` (the perturbation `Results`; `results.doc["superweights"]` holds the
    detector's per-layer table and the per-candidate comparison)."""

    candidates: Any
    controls: Any
    results: Any
    path: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return self.results.fingerprint

    @property
    def table(self) -> list[dict[str, Any]]:
        """One row per candidate: its coordinates, spike and proof."""
        doc = self.results.doc.get("superweights") or {}
        return [{**c, **p} for c, p in zip(doc.get("candidates") or [], doc.get("proof") or [], strict=False)]

    @property
    def layers(self) -> list[dict[str, Any]]:
        return list((self.results.doc.get("superweights") or {}).get("layers") or [])

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.table)


@dataclass(frozen=True)
class _Paths:
    results: Path | None
    candidates: Path | None
    controls: Path | None
    json: Path | None


def _paths(output, selection_output, controls_output, json_path, fps: tuple[str, str, str]) -> _Paths:
    """-o (or the default under ./cwa-out/ when `output` is AUTO; None: in memory), and the
    two selections: given, beside -o (`{stem}_candidates.h5`, `{stem}_controls.h5`), or
    under ./cwa-out/ by fingerprint."""
    from cwa import artifacts as A
    from cwa.stages import AUTO

    j = None if json_path is None else Path(json_path)
    if output is None:
        return _Paths(None, None if selection_output is None else Path(selection_output),
                      None if controls_output is None else Path(controls_output), j)
    fp, fp_sel, fp_ctl = fps
    out = A.resolve_output(None if output == AUTO else output, "superweights", fp, ".h5")

    def beside(given, suffix: str, stage: str, f: str) -> Path:
        if given is not None:
            return Path(given)
        if output == AUTO:
            return A.default_output(stage, f, ".h5")
        return out.with_name(f"{out.stem}_{suffix}.h5")

    return _Paths(out, beside(selection_output, "candidates", KIND, fp_sel),
                  beside(controls_output, "controls", "random_k", fp_ctl), j)


def _fingerprints(lm, ev, ids, module, ratio, threshold, all_layers, draws, seed) -> tuple[str, str, str]:
    from cwa import artifacts as A
    from cwa.evaluation import EVAL_VERSION
    from cwa.rng import RNG_VERSION

    # the load dtype changes the activations and the NLLs (the model fingerprint ignores it)
    fp_sel = A.stage_fingerprint(KIND, model=lm.fingerprint, dtype=lm.dtype, prompt=ids, module=module, spike_ratio=ratio,
                                 spike_threshold=threshold, all_layers=all_layers, seed=seed, version=DETECT_VERSION)
    fp_ctl = A.stage_fingerprint("superweight-control", candidates=fp_sel, draws=draws, seed=seed, rng=RNG_VERSION)
    fp = A.stage_fingerprint("superweights", candidates=fp_sel, controls=fp_ctl, data=ev.fingerprint,
                             method="zero", version=EVAL_VERSION)
    return fp, fp_sel, fp_ctl


def _cached(paths: _Paths, fps, force: bool) -> SuperWeights | None:
    from cwa import artifacts as A

    fp, fp_sel, fp_ctl = fps
    if paths.results is None or force:
        return None
    pairs = ((paths.results, fp), (paths.candidates, fp_sel), (paths.controls, fp_ctl))
    if not all(A.cached(p, f, A.h5_fingerprint_of) for p, f in pairs):
        return None
    res = A.read_results(paths.results)
    if paths.json is not None:
        A.write_json(paths.json, res.doc)
    return SuperWeights(A.read_selection(paths.candidates), A.read_selection(paths.controls), res, paths.results)


def _log_table(spikes: list[LayerSpike], chosen: list[int], ratio: float, all_layers: bool) -> None:
    from cwa.console import log

    for i, s in enumerate(spikes):
        mark = "candidate" if i in chosen else ""
        log(f"  layer {s.layer}: out spike {s.out_max:.4g} at channel {s.row} (token {s.out_token}), "
            f"{s.ratio:.3g}x median; in spike {s.in_max:.4g} at channel {s.col}; W[{s.row},{s.col}] = {s.weight:.4g} "
            f"{mark}", verbose_only=not mark)
    if not all_layers and not any(s.passed for s in spikes):
        best = spikes[chosen[0]]
        log(f"note: no layer's down-projection spike reaches {ratio:g}x its median; testing the largest "
            f"({best.ratio:.3g}x, layer {best.layer}) anyway")


def superweights_stage(
    lm,
    data,
    *,
    prompt: str = DEFAULT_PROMPT,
    spike_ratio: float = DEFAULT_SPIKE_RATIO,
    spike_threshold: float | None = None,
    all_layers: bool = False,
    module: str | None = None,
    draws: int = 20,
    seed: int = 0,
    output: PathLike | None = None,
    selection_output: PathLike | None = None,
    controls_output: PathLike | None = None,
    json_path: PathLike | None = None,
    force: bool = False,
):
    """Detect super-weight candidates on `prompt`, zero each alone against `draws`
    random single weights (see the module docstring). Returns a `cwa.stages.StageResult`
    whose value is `SuperWeights`; `output=None` keeps everything in memory, `AUTO` or a
    path writes the results (primary) and the two selections."""
    from cwa import artifacts as A
    from cwa.stages import StageResult, _input_files, guard_outputs, perturb_stage

    t0 = time.perf_counter()
    ratio, threshold, draws, seed = check_options(spike_ratio, spike_threshold, draws, seed)
    ids = prompt_ids(lm.tokenizer, prompt)
    ev = data.split(lm, seed=seed, calib=False, evaluation=True).evaluation
    fps = _fingerprints(lm, ev, ids, module, ratio, threshold, all_layers, draws, seed)
    paths = _paths(output, selection_output, controls_output, json_path, fps)
    guard_outputs({"-o": paths.results, "--selection": paths.candidates, "--controls-out": paths.controls,
                   "--json": paths.json}, _input_files(lm=lm, data=data))
    hit = _cached(paths, fps, force)
    if hit is not None:
        return StageResult(paths.results, fps[0], True, time.perf_counter() - t0, {}, hit)
    options = {"prompt": prompt, "prompt_ids": ids, "module": module, "spike_ratio": ratio,
               "spike_threshold": threshold, "all_layers": all_layers, "version": DETECT_VERSION}
    projs = down_projections(lm.model, module)
    spikes = detect(lm.model, ids, projs)
    chosen = pick(spikes, ratio, threshold, all_layers)
    _log_table(spikes, chosen, ratio, all_layers)
    cand = candidate_selection(lm, projs, spikes, chosen, ids, prompt, seed, fps[1], options)
    if paths.candidates is not None:
        cand.save(paths.candidates)
    ctl = control_selection(lm, cand, draws, seed, fps[2])
    if paths.controls is not None:
        ctl.save(paths.controls)
    res = perturb_stage(lm, data, [cand, ctl], method="zero", seed=seed).value
    res.attrs["perturb_fingerprint"] = res.attrs.get("fingerprint")
    res.attrs["fingerprint"] = fps[0]
    res.doc["superweights"] = {"detector": options, "layers": [s.to_dict() for s in spikes],
                               "candidates": cand.info["candidates"], "proof": compare(res, len(chosen)),
                               "controls": _controls_summary(res, len(chosen))}
    if paths.results is not None:
        res.save(paths.results, paths.json)
    elif paths.json is not None:
        A.write_json(paths.json, res.doc)
    sw = SuperWeights(cand, ctl, res, paths.results)
    return StageResult(paths.results, fps[0], False, time.perf_counter() - t0, {}, sw)
