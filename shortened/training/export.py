"""The end of a phase: one Hugging Face checkpoint of the trained model on rank 0 (ZeRO-3 shards gathered, LoRA
merged), in the source model's dtype, with the pruning plan and ``retraining.json`` (:func:`retraining_record`)
beside it."""

from __future__ import annotations

import json

import torch

from shortened import storage
from shortened.pruning import PRUNING_JSON
from shortened.training.phase import Phase, build_model

RETRAINING_JSON = "retraining.json"  # beside every retrained model: what each phase ran (retraining_record)


def export(engine, phase: Phase, rank: int, history: list[dict], world_size: int = 1,
           zero: dict | None = None) -> None:
    """One Hugging Face checkpoint on rank 0 (ZeRO-3 shards gathered; LoRA merged), pruning plan beside it;
    ``zero`` (the ZeRO stage and offloads the phase ran with) goes into ``retraining.json``."""
    from shortened.io import resolve_save_dtype, save_pretrained_as, staged_dir, write_json_atomic
    from shortened.models import load_tokenizer

    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    out = storage.path(phase.out)  # a local folder, or an object-store URL (uploaded when complete)
    model = build_model(phase)  # a fresh fp32 CPU copy, same structure, to load the trained weights into
    trained_in = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    # (copying into the fp32 parameters upcasts exactly: no fp32 copy of the whole state is needed)
    missing, unexpected = model.load_state_dict({k: v.cpu() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if unexpected or missing:
        raise RuntimeError(f"exported state does not fit the model: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}")
    targets = getattr(model, "shortened_lora_targets", None)
    if phase.method == "lora":
        model = model.merge_and_unload()
    with staged_dir(out) as staging:  # published whole, or not at all
        # in the --model folder's dtype (a pruned bf16 model is exported in bf16), else the training dtype; LoRA is
        # merged in fp32 above and cast once here, in place (the copy is thrown away)
        saved = save_pretrained_as(model, staging, resolve_save_dtype(phase.train.save_dtype, phase.model,
                                                                      fallback=trained_in), in_place=True)
        load_tokenizer(phase.model).save_pretrained(staging)
        plan = storage.path(phase.model) / PRUNING_JSON  # (a model at an object-store URL: read there)
        if plan.is_file():
            (staging / PRUNING_JSON).write_bytes(plan.read_bytes())
        write_json_atomic(staging / RETRAINING_JSON, {**retraining_record(phase, history, world_size, targets, zero),
                                                      "saved_dtype": saved})


def retraining_record(phase: Phase, history: list[dict], world_size: int, lora_targets: dict | None = None,
                      zero: dict | None = None) -> dict:
    """``retraining.json``: what this phase actually ran (tokens requested and trained, workers, the ZeRO stage and
    offloads it ran with, the LoRA modules resolved for this architecture), and every phase of the run
    (``cpt+lora``: the CPT phase first). ``zero``: ``{"zero_stage", "offload_optimizer", "offload_params",
    "attn_implementation"}``."""
    trained = int(history[-1]["tokens"]) if history else 0
    this = {"method": phase.method, "run": phase.run, "base_model": phase.model, "teacher": phase.teacher,
            "tokens_requested": phase.tokens, "tokens_trained": trained, "world_size": world_size,
            "steps": int(history[-1]["step"]) if history else 0, **(zero or {})}
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
            "zero_stage": (zero or {}).get("zero_stage"), "phases": phases,
            "tokens_trained_total": sum(p["tokens_trained"] for p in phases),
            "config": phase.train.model_dump(mode="json"), "history": history}
