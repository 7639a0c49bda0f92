"""``python -m dispatchattn aot``: options, output formats and exit status (on cached or cheap compiles)."""

from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("triton")

from dispatchattn.tools import aot_report  # noqa: E402


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    aot_report.add_aot_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["aot", *argv])


def test_defaults_cover_every_aot_target_plain_bf16_d128():
    args = _parse()
    assert args.target == list(aot_report.AOT_TARGETS) and args.dtype == ["bf16"] and args.head_dim == [128]
    assert aot_report._variants(args) == [(None, None)]


def test_masks_and_scores_combine_into_variants():
    args = _parse("--mask", "causal,sliding_window", "--score", "softcap")
    assert aot_report._variants(args) == [("causal", "softcap"), ("sliding_window", "softcap")]
    assert aot_report.variant_name("causal", "softcap") == "causal+softcap"


def test_unknown_variant_names_the_known_ones():
    with pytest.raises(SystemExit, match="unknown variant 'diagonal'; expected one of causal"):
        aot_report._variants(_parse("--mask", "diagonal"))


def test_json_output_and_check_exit_status(capsys):
    args = _parse("--target", "sm_90", "--kernel", "bwd_preprocess", "--json", "--check")
    status = aot_report.run_aot(args)
    records = json.loads(capsys.readouterr().out)
    assert [(r["kernel"], r["target"], r["dtype"]) for r in records] == [("bwd_preprocess", "sm_90", "bf16")]
    assert status == (0 if records[0]["fits"] else 1)
    assert records[0]["matrix_instr"] == "none" and records[0]["expected_matrix_instr"] is None


def test_forced_config_is_compiled_as_given(capsys):
    args = _parse("--target", "gfx942", "--kernel", "fwd", "--config", "32,32,4,1")
    assert aot_report.run_aot(args) == 0
    table = capsys.readouterr().out
    assert "gfx942" in table and "32x32 w4 s1" in table and " fwd " in table


def test_backward_pre_pass_always_compiles_with_its_own_config(capsys):
    """The pre-pass (a row reduction) runs with kernels.PREPROCESS_CONFIG whatever the backward's tiles."""
    args = _parse("--target", "sm_80", "--kernel", "bwd_preprocess", "--dtype", "fp16", "--config", "64,64,8,2")
    assert aot_report.run_aot(args) == 0
    table = capsys.readouterr().out
    assert "32x64 w4 s1" in table and "64x64 w8" not in table


def doubled_score(score, b, h, q_idx, kv_idx):
    """A user's own score_mod, as ``--score-mod test_aot_cli:doubled_score`` imports it."""
    return score * 2.0


def test_a_users_own_mod_is_imported_and_planned_without_compiling():
    args = _parse("--score-mod", f"{__name__}:doubled_score", "--mask", "causal")
    variants = aot_report._variants(args)
    assert variants == [("causal", doubled_score)]
    (job,) = aot_report.plan(["sm_90"], variants, ["bf16"], [128], ["fwd"])
    assert job.variant == "causal+doubled_score" and job.kernel == "fwd" and job.target == "sm_90"
    generated_files = [ref[2] for ref in job.constexprs.values() if isinstance(ref, tuple)]
    assert generated_files and all(path.endswith(".py") for path in generated_files)


def test_mod_spec_must_name_module_and_attribute():
    with pytest.raises(SystemExit, match="expected MODULE:NAME"):
        aot_report.load_mod("just_a_module")


def test_decoding_kernels_are_compiled_with_their_shipped_config(capsys):
    """``--kernel decode,decode_reduce``: the decoding kernel on its 64-row wgmma tile, the reduction (no dot) with
    its own 4-warp, one-stage config (shared by every test: cached after the first compile)."""
    args = _parse("--target", "sm_90", "--kernel", "decode,decode_reduce", "--json", "--check")
    status = aot_report.run_aot(args)
    records = {r["kernel"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(records) == {"decode", "decode_reduce"} and status == 0
    assert records["decode"]["matrix_instr"] == "wgmma" and records["decode"]["config"]["block_m"] == 64
    assert records["decode_reduce"]["expected_matrix_instr"] is None
    reduce_config = records["decode_reduce"]["config"]
    assert reduce_config["num_warps"] == 4 and reduce_config["num_stages"] == 1
