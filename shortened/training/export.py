"""The end of a phase: one Hugging Face checkpoint of the trained model on rank 0 (gathered module by module, LoRA
merged), in the source model's dtype, with the pruning plan and ``retraining.json`` (:func:`retraining_record`)
beside it.

Memory: under ZeRO-3 the weights are gathered one module at a time (``deepspeed.zero.GatheredParameters``, every
rank takes part); rank 0 keeps a copy of each in the saved dtype and the others drop it at once, so rank 0 holds
at most one full copy (in the saved dtype) and the other ranks none; under ZeRO 0–2 rank 0 casts the weights it
already holds. No fresh copy of the model is built.
"""

from __future__ import annotations

import json
import resource

import torch

from shortened import storage
from shortened.pruning import PRUNING_JSON
from shortened.training.phase import Phase

RETRAINING_JSON = "retraining.json"  # beside every retrained model: what each phase ran (retraining_record)


def export(engine, phase: Phase, rank: int, history: list[dict], world_size: int = 1,
           zero: dict | None = None, resumes: list[dict] | None = None) -> None:
    """One Hugging Face checkpoint on rank 0 (ZeRO-3 partitions gathered module by module; LoRA merged), pruning
    plan beside it; ``zero`` (the ZeRO stage and offloads the phase ran with) goes into ``retraining.json``, with
    every rank's peak resident memory (``peak_rss_mb``). Every rank must call it (the gathers and the memory
    record are collectives). The live model is consumed: LoRA layers are merged into it and removed."""
    from shortened.io import resolve_save_dtype, staged_dir, write_json_atomic
    from shortened.models import load_tokenizer

    partitioned = bool(engine.zero_optimization_partition_weights())
    release_optimizer_state(engine)  # training is over (the last checkpoint holds it): room for the gathered copy
    model = engine.module
    targets = getattr(model, "shortened_lora_targets", None)
    trained_in = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if phase.method == "lora":
        model = merge_lora(model, rank, partitioned)
    # in the --model folder's dtype (a pruned bf16 model is exported in bf16), else the training dtype
    dtype = resolve_save_dtype(phase.train.save_dtype, phase.model, fallback=trained_in)
    state = gathered_state_dict(model, dtype, rank, partitioned)
    peaks = peak_rss_mb(engine.device, rank, world_size)  # the other ranks are done: their peaks are final
    if rank != 0:
        return
    out = storage.path(phase.out)  # a local folder, or an object-store URL (uploaded when complete)
    with staged_dir(out) as staging:  # published whole, or not at all
        saved = save_state_dict(model, state, staging, dtype)
        del state
        load_tokenizer(phase.model).save_pretrained(staging)
        plan = storage.path(phase.model) / PRUNING_JSON  # (a model at an object-store URL: read there)
        if plan.is_file():
            (staging / PRUNING_JSON).write_bytes(plan.read_bytes())
        peaks[0] = max(peaks[0], _own_peak_rss_mb())  # rank 0's, with the checkpoint written
        write_json_atomic(staging / RETRAINING_JSON, {**retraining_record(phase, history, world_size, targets, zero,
                                                                          peak_rss=peaks, resumes=resumes),
                                                        "saved_dtype": saved})


def release_optimizer_state(engine) -> None:
    """Free the optimizer's per-parameter state (AdamW's two moments: 8 bytes per parameter, divided among the ranks
    under ZeRO 1–3) once training is over, so that the export's gathered copy takes its place instead of adding to
    the peak. Walks DeepSpeed's wrappers (``.optimizer``) down to the torch optimizer(s) and clears their
    ``state``; the engine must not step again."""
    import gc

    opt, seen = getattr(engine, "optimizer", None), set()
    while opt is not None and id(opt) not in seen:
        seen.add(id(opt))
        if isinstance(opt, torch.optim.Optimizer):
            opt.state.clear()
        opt = getattr(opt, "optimizer", None)
    gc.collect()


def merge_lora(model, rank: int, partitioned: bool) -> torch.nn.Module:
    """The PEFT ``model`` with every LoRA layer merged into its base weights (peft's ``merge``) and the adapters
    removed (``unload``); returns the bare Hugging Face model. Every rank must call it. ZeRO-3 (``partitioned``):
    each LoRA layer is gathered, merged on rank 0 and re-partitioned, in the training dtype. ZeRO 0–2: rank 0
    merges each layer in fp32 (upcast first; the live model is not trained further), the other ranks skip it."""
    from deepspeed.runtime.zero import GatheredParameters
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and hasattr(m, "base_layer")]
    for layer in layers:
        if partitioned:
            with GatheredParameters(list(layer.parameters()), modifier_rank=0):
                if rank == 0:
                    layer.merge()
        elif rank == 0:
            layer.float()
            layer.merge()
    return model.unload()


def gathered_state_dict(model: torch.nn.Module, dtype: torch.dtype, rank: int, partitioned: bool
                        ) -> dict[str, torch.Tensor] | None:
    """Rank 0: the model's state dict (parameters, each once — tied weights under their first name — and persistent
    buffers) as CPU tensors in ``dtype`` (integer tensors, and those the architecture keeps in fp32, as they are);
    other ranks: None. ``partitioned`` (ZeRO-3): each module's own parameters are gathered in turn on every rank
    (a collective) and copied on rank 0 only, so no rank ever holds more than one module beyond its partition and
    rank 0's copy."""
    from deepspeed.runtime.zero import GatheredParameters

    from shortened.io import _keep_fp32

    keep = _keep_fp32(model, dtype)
    state: dict[str, torch.Tensor] | None = {} if rank == 0 else None
    seen: set[int] = set()

    def copy(name: str, t: torch.Tensor) -> torch.Tensor:
        to = dtype if t.is_floating_point() and not keep(name) else t.dtype
        c = t.detach().to("cpu", to)
        # a gathered tensor is freed on leaving the gather: keep a copy, not a view
        return c.clone() if partitioned and c.data_ptr() == t.data_ptr() else c

    for prefix, module in model.named_modules():
        own = [(f"{prefix}.{n}" if prefix else n, p) for n, p in module.named_parameters(recurse=False)
               if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        if own and (partitioned or rank == 0):
            with GatheredParameters([p for _, p in own], modifier_rank=None, enabled=partitioned):
                if state is not None:
                    state.update((name, copy(name, p)) for name, p in own)
        if state is not None:
            for n, b in module.named_buffers(recurse=False):
                if b is not None and n not in module._non_persistent_buffers_set:
                    name = f"{prefix}.{n}" if prefix else n
                    state[name] = copy(name, b)
    return state


def save_state_dict(model, state: dict[str, torch.Tensor], folder, dtype: torch.dtype) -> str:
    """``model.save_pretrained(folder, state_dict=state)`` (transformers' sharding, tied-weight and weight-name
    handling; each shard's tensors are released as it is written) with ``config.json``'s ``dtype`` — and its
    sub-configs' that name one — set to ``dtype``, which ``save_pretrained`` would take from the live (training)
    parameters instead. Returns the dtype name written (``"bfloat16"``)."""
    from shortened.io import stamp_config_dtype

    model.save_pretrained(folder, state_dict=state)
    return stamp_config_dtype(folder, dtype)


def _own_peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (``getrusage``: Linux counts it in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb(device: torch.device, rank: int, world_size: int) -> list[float]:
    """Every rank's peak resident memory so far (MiB, rank order), on every rank (an all-reduce on ``device``)."""
    peaks = torch.zeros(world_size, dtype=torch.float64, device=device)
    peaks[rank] = _own_peak_rss_mb()
    if world_size > 1:
        torch.distributed.all_reduce(peaks)
    return [round(v, 1) for v in peaks.tolist()]


def retraining_record(phase: Phase, history: list[dict], world_size: int, lora_targets: dict | None = None,
                      zero: dict | None = None, peak_rss: list[float] | None = None,
                      resumes: list[dict] | None = None) -> dict:
    """``retraining.json``: what this phase actually ran (tokens requested and trained, workers, the ZeRO stage and
    offloads it ran with, the LoRA modules resolved for this architecture, each worker's peak resident memory in
    MiB as ``peak_rss_mb``, rank order), and every phase of the run (``cpt+lora``: the CPT phase first). ``zero``:
    ``{"zero_stage", "offload_optimizer", "offload_params", "attn_implementation"}``. ``resumes``: every resume of
    this phase from a checkpoint, ``{"step", "tokens", "workers_before", "workers_after"}`` (empty: it never
    resumed), in the phase's entry and at the top."""
    trained = int(history[-1]["tokens"]) if history else 0
    this = {"method": phase.method, "run": phase.run, "base_model": phase.model, "teacher": phase.teacher,
            "tokens_requested": phase.tokens, "tokens_trained": trained, "world_size": world_size,
            "steps": int(history[-1]["step"]) if history else 0, **(zero or {}), "resumes": list(resumes or [])}
    if peak_rss is not None:
        this["peak_rss_mb"] = peak_rss
    lora = lora_targets if phase.method == "lora" else None
    if lora is not None:
        this["lora_targets"] = lora
    phases = []
    for folder in phase.earlier:
        earlier = storage.path(folder) / RETRAINING_JSON
        if earlier.is_file():
            phases += json.loads(earlier.read_text()).get("phases", [])
    phases.append(this)
    return {"method": phase.method, "base_model": phase.model, "tokens": phase.tokens, "tokens_trained": trained,
            "world_size": world_size, "teacher": phase.teacher, "lora_targets": lora,
            "zero_stage": (zero or {}).get("zero_stage"), "phases": phases, "resumes": this["resumes"],
            "tokens_trained_total": sum(p["tokens_trained"] for p in phases),
            "config": phase.train.model_dump(mode="json"), "history": history}
