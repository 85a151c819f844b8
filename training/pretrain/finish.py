"""The end of a run: the final evaluation and samples, a last checkpoint, and the model folder with
its summary."""

from __future__ import annotations

import json

from iterative_llm import run_folder

from training.eval.bits_per_byte import hardware
from training.pretrain.budget import format_seconds
from training.pretrain.export import export_model_folder
from training.pretrain.run_state import Run


def finish(run: Run) -> dict:
    """The final evaluation and samples, a last checkpoint, and the model folder with its summary."""
    state, budget = run.state, run.budget
    with budget.phase("final_eval"):
        result = run.evaluate()
        run.say(f"final: step {state['step']}, {state['tokens']:,} tokens, {state['time']:.1f} s of training, "
                f"val loss {result['val_loss']:.4f}, {result['val_bpb']:.4f} bits per byte")
        run.samples()
        run.checkpoint("end of training")
    config = run.config
    summary = {
        "steps": state["step"], "tokens": state["tokens"], "time": round(state["time"], 3),
        "final_val_loss": result["val_loss"], "final_val_bpb": result["val_bpb"],
        "parameters": run.raw_model.num_parameters(), "preset": config.model_preset, "data": config.data,
        "train_tokens_available": run.train_split.num_tokens, "val_tokens": run.val_split.num_tokens,
        "processes": run.world_size, "precision": run.precision, "hardware": hardware(run.device, run.world_size),
        "compile": config.compile, "compile_seconds": round(run.compile_seconds, 3),
        "compile_fallback": run.compile_fallback,
        "first_loss": run.first_loss,
        # Data sized to the run: what was tokenised for training, and what training read of it.
        "tokens_prepared": run.train_split.num_tokens, "tokens_trained": state["tokens"],
        "tokens_prepared_before_first_step": run.tokens_prepared_first,
        "seconds_to_first_step": None if budget.first_step_at is None else round(budget.first_step_at, 3),
        # Tokenised in a thread while training ran (an accelerator's run), not on the clock's phases.
        "seconds_tokenising_beside_training": round(run.beside.seconds, 3) if run.beside is not None else None,
        "plan": {"precision": run.plan.precision.reason, "micro_batch": run.plan.micro_batch.value,
                 "micro_batch_why": run.plan.micro_batch.reason, "model": run.plan.model, "depth": run.plan.depth,
                 "tokens_per_second_probed": run.plan.tokens_per_second,
                 "tokenise_beside_training": None if run.plan.tokenise_beside is None else run.plan.tokenise_beside.value,
                 "ladder": [c.record() for c in run.plan.ladder] if run.plan.ladder else None},
    }
    if run.main_process:
        with budget.phase("export"):
            # The export's own seconds cannot be in the summary it writes: it is written again after.
            export_model_folder(run.out, run.raw_model, run.tokenizer, {**summary, "phases": budget.summary()})
        summary["phases"] = budget.summary()
        (run.out / run_folder.SUMMARY).write_text(json.dumps(summary, indent=2), encoding="utf-8")
        run.say(f"model folder: {run.out} (load it with AutoModelForCausalLM.from_pretrained({str(run.out)!r}))"
                + (f"; the whole command took {format_seconds(budget.elapsed())} of its "
                   f"{format_seconds(budget.seconds)}" if budget.seconds is not None else ""))
    end_processes(run.accelerator)
    return summary


def end_processes(accelerator) -> None:
    """The end of a run, in order on every process: all meet, the trackers close, the process group goes
    (accelerate's end_training calls torch.distributed.destroy_process_group)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
