"""transformers' contract for causal LMs, asserted on our model: torch.compile on the CPU. What the
contract is, and what these tests share, is in tests/model/hf_contract.py."""

from __future__ import annotations

import time
from unittest import mock

import pytest
import torch
import torch._dynamo

from iterative_llm import IterativeLLMForCausalLM
from tests.conftest import locale_is_utf8, tiny_config, tiny_model
from tests.model.hf_contract import COMMON_GENERATE, build, common_inputs, ids, left_padded_generation_inputs
from tests.model.hf_contract import one_intra_op_thread  # noqa: F401  (autouse: one thread here)


def compile_or_skip(fn):
    """Run fn (which compiles); skip if this machine has no working C++ toolchain for inductor, or if
    compiling took more than 60 s (then the result is not checked, to keep CI time bounded)."""
    try:
        from torch._inductor.exc import CppCompileError, InvalidCxxCompiler
    except Exception as error:  # pragma: no cover - depends on the torch build
        pytest.skip(f"torch.compile unavailable: {error}")
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as error:
        chain, cause = [], error
        while cause is not None and len(chain) < 10:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        toolchain = (InvalidCxxCompiler, CppCompileError)
        if any(isinstance(e, toolchain) for e in chain) or any(t.__name__ in str(error) for t in toolchain):
            pytest.skip(f"torch.compile cannot build kernels here: {type(error).__name__}: {str(error)[:200]}")
        if "codec can't decode" in str(error) and not locale_is_utf8():
            # CI's run as on Windows (an ASCII locale): inductor reads its kernel templates in the locale's
            # encoding (torch/_inductor/utils.py load_template); cp1252, Windows' own, decodes them.
            pytest.skip(f"torch.compile under an ASCII locale: {str(error)[:200]}")
        raise
    elapsed = time.perf_counter() - start
    if elapsed > 60:
        pytest.skip(f"torch.compile took {elapsed:.0f} s (> 60 s); result was not checked")
    return result


@pytest.mark.slow
def test_compiled_forward_matches_eager():
    model = tiny_model()
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
        torch.compiler.reset()
        compiled = torch.compile(model, fullgraph=True)
        logits = compile_or_skip(lambda: compiled(x).logits)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_generate_compiles_the_forward_fullgraph_without_recompiling_and_keeps_all_outputs():
    """transformers' test_generate_compile_model_forward_fullgraph and test_generate_compilation_all_outputs,
    in one test (compiling dominates its time): a dynamic-cache run is never auto-compiled; a static-cache
    run with a fullgraph CompileConfig compiles the forward, a second input set of the same shapes causes
    no recompilation, and every output (sequences, scores, logits, attentions, hidden states) matches the
    same static-cache generation run eagerly."""
    from transformers import CompileConfig

    config = tiny_config()
    config.is_decoder = True
    model = build(IterativeLLMForCausalLM, config)
    model.set_attn_implementation("eager")  # attention weights are among the outputs
    compile_config = CompileConfig(fullgraph=True, dynamic=False)
    compile_config._compile_all_devices = True  # transformers' test forces compilation on CPU the same way
    common = dict(**COMMON_GENERATE, do_sample=False, return_dict_in_generate=True, output_scores=True,
                  output_logits=True, output_attentions=True, output_hidden_states=True)
    inputs = [left_padded_generation_inputs(), {k: v[2:4] for k, v in common_inputs(vocab=128, seed=1).items()}]
    torch.compiler.reset()
    model.generate(**inputs[0], **common)  # dynamic cache: never auto-compiled
    assert getattr(model, "_compiled_call", None) is None
    eager = [model.generate(**x, **common, cache_implementation="static") for x in inputs]  # CPU: not compiled
    assert getattr(model, "_compiled_call", None) is None

    def run():
        first = model.generate(**inputs[0], **common, cache_implementation="static", compile_config=compile_config)
        # Same shapes again: any recompilation is an error (a guard on a Python value would recompile).
        with mock.patch.object(torch._dynamo.config, "error_on_recompile", True):
            second = model.generate(
                **inputs[1], **common, cache_implementation="static", compile_config=compile_config
            )
        return [first, second]

    compiled = compile_or_skip(run)
    assert getattr(model, "_compiled_call", None) is not None
    max_len = 7 + 3 - 1  # a static cache: every step attends over the whole (masked) cache
    for a, b in zip(eager, compiled):
        assert b.cache.is_compileable
        assert torch.equal(a.sequences, b.sequences)
        for name in ("scores", "logits"):
            assert len(getattr(b, name)) == 3
            for x, y in zip(getattr(a, name), getattr(b, name)):
                torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
        for step in range(3):
            in_len = 7 if step == 0 else 1
            assert len(b.attentions[step]) == config.num_hidden_layers
            assert len(b.hidden_states[step]) == config.num_hidden_layers + 1
            for x, y in zip(a.attentions[step], b.attentions[step]):
                assert y.shape == (2, config.num_attention_heads, in_len, max_len)
                torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
            for x, y in zip(a.hidden_states[step], b.hidden_states[step]):
                assert y.shape == (2, in_len, config.hidden_size)
                torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
