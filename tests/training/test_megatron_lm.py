"""Megatron-LM integration contract (Megatron-LM is not on PyPI: the test plays its part; the real run of
pretrain_gpt.py at core_v0.19.0 on an H200 is examples/megatron_lm_h200.sh, recorded in docs/megatron_lm.md).

* extra_args_provider adds only --dsv3-* flags, none clashing with Megatron-LM core_v0.16.1's or core_v0.19.0's
  (their option strings, plus the ones 0.16.1 generates from TransformerConfig fields), and parses; it makes
  --help printable where a Megatron-LM help string holds a stray '%' (core_v0.19.0);
* model_provider / dsv3_builder build our model from a namespace with Megatron-LM's argument names, honour
  the sizes and parallel flags, switch megatron's own expert-bias update off, and the model follows
  pretrain_gpt's forward_step contract (per-token loss [b, s] with labels and loss_mask);
* the optimizer-step hook (after_global_batch) moves the bias once and sets the MTP lambda;
* the launcher calls pretrain() in the form of the checkout: core_v0.18+ (parse_and_validate_args, then
  pretrain(config container with model=None, ..., model_provider=...)) and core_v0.16-0.17 (pretrain parses),
  and skips Megatron-LM's `make` of the dataset helpers when megatron-core's wheel ships them built.
"""
import argparse
import dataclasses
import os
import sys
import types

import pytest
import torch

from megatron_dsv3 import megatron_lm

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _megatron_flags(release):
    from megatron.core.transformer.transformer_config import TransformerConfig
    flags = {l.strip() for l in open(os.path.join(FIXTURES, f"megatron_lm_{release}_flags.txt")) if l.startswith("--")}
    flags |= {"--" + f.name.replace("_", "-") for f in dataclasses.fields(TransformerConfig)}
    return flags


@pytest.mark.parametrize("release", ["core_v0.16.1", "core_v0.19.0"])
def test_extra_args_provider_adds_non_clashing_flags(release):
    megatron = _megatron_flags(release)
    parser = argparse.ArgumentParser()
    for f in sorted(megatron):          # a parser with every Megatron-LM flag: a clash raises here
        parser.add_argument(f, default=None)
    parser = megatron_lm.extra_args_provider(parser)
    ours = [s for a in parser._actions for s in a.option_strings if s.startswith("--dsv3-")]
    assert len(ours) >= 8 and not set(ours) & megatron
    args = parser.parse_args(["--dsv3-preset", "tiny", "--dsv3-bias-update-rate", "0:0.001,14.3e12:0",
                              "--dsv3-mtp-loss-weight", "0:0.3,10e12:0.1", "--num-layers", "3"])
    assert args.dsv3_preset == "tiny" and args.dsv3_bias_update_rate == "0:0.001,14.3e12:0"


def _megatron_args(**kw):
    """The names Megatron-LM's parse_args gives (values for the tiny preset)."""
    a = dict(num_layers=3, hidden_size=128, num_attention_heads=4, seq_length=32, max_position_embeddings=1024,
             padded_vocab_size=384, params_dtype=torch.float32, bf16=False, fp16=False, transformer_impl="local",
             tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=1,
             expert_tensor_parallel_size=None, context_parallel_size=1, virtual_pipeline_model_parallel_size=None,
             sequence_parallel=False, decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None,
             num_experts=8, mtp_num_layers=None, mtp_loss_scaling_factor=0.1, rotary_scaling_factor=1.0,
             consumed_train_samples=0, global_batch_size=4, curr_iteration=0, log_interval=1,
             dsv3_preset="tiny", dsv3_config=None, dsv3_hf_config=None, dsv3_bias_update_rate="0:0.01",
             dsv3_mtp_loss_weight="0:0.3,1000:0.1", dsv3_seq_aux_loss_coeff=None, dsv3_init_method_std=None,
             dsv3_yarn_original_max_position_embeddings=None, dsv3_yarn_beta_fast=None, dsv3_yarn_beta_slow=None,
             dsv3_recompute_mla_up_proj=False)
    a.update(kw)
    return types.SimpleNamespace(**a)


def test_config_from_megatron_args():
    cfg = megatron_lm.config_from_megatron_args(_megatron_args(num_layers=4, hidden_size=256, seq_length=64,
                                                               decoder_first_pipeline_num_layers=None))
    assert (cfg.num_layers, cfg.hidden_size, cfg.seq_length, cfg.vocab_size) == (4, 256, 64, 384)
    assert cfg.moe.bias_update_rate == ((0, 0.01),) and cfg.mtp.loss_weight == ((0, 0.3), (1000, 0.1))
    assert cfg.padded_vocab_size == 384 and cfg.params_dtype == "float32"
    with pytest.raises(ValueError, match="--num-experts"):
        megatron_lm.config_from_megatron_args(_megatron_args(num_experts=16))
    with pytest.raises(ValueError, match="--mtp-num-layers"):
        megatron_lm.config_from_megatron_args(_megatron_args(pipeline_model_parallel_size=2,
                                                             decoder_first_pipeline_num_layers=2))
    with pytest.raises(ValueError, match="--reset-position-ids"):
        megatron_lm.config_from_megatron_args(_megatron_args(pipeline_model_parallel_size=3, mtp_num_layers=1,
                                                             reset_position_ids=True))
    assert megatron_lm.config_from_megatron_args(_megatron_args(reset_position_ids=True)).num_layers == 3
    # Megatron-LM's --fp8-format / --fp8-recipe: e4m3 + blockwise switch FP8 on, any other recipe is refused
    assert megatron_lm.config_from_megatron_args(_megatron_args(fp8="e4m3", fp8_recipe="blockwise")).fp8.enabled
    assert not megatron_lm.config_from_megatron_args(_megatron_args(fp8=None)).fp8.enabled
    kept = megatron_lm.config_from_megatron_args(_megatron_args(fp8="e4m3", fp8_recipe="blockwise",
                                                                dsv3_fp8_bf16_modules="experts")).fp8.bf16_modules
    assert kept[-1] == "experts" and "router" in kept
    with pytest.raises(ValueError, match="^--dsv3-fp8-bf16-modules experts needs --fp8-format e4m3"):
        megatron_lm.config_from_megatron_args(_megatron_args(fp8=None, dsv3_fp8_bf16_modules="experts"))
    for fmt, recipe in (("e4m3", "delayed"), ("hybrid", "blockwise"), ("e4m3", "tensorwise")):
        with pytest.raises(ValueError, match=f"^--fp8-format {fmt} --fp8-recipe {recipe}: DeepSeek-V3 trains in FP8 "
                                             f"as E4M3 with block-wise scaling"):
            megatron_lm.config_from_megatron_args(_megatron_args(fp8=fmt, fp8_recipe=recipe))
    big = megatron_lm.config_from_megatron_args(_megatron_args(
        dsv3_preset="dsv3-671b", num_layers=61, hidden_size=7168, num_attention_heads=128, seq_length=4096,
        max_position_embeddings=163840, padded_vocab_size=129280, num_experts=256, mtp_num_layers=1,
        pipeline_model_parallel_size=16, expert_model_parallel_size=64, decoder_first_pipeline_num_layers=3,
        decoder_last_pipeline_num_layers=2, params_dtype=torch.bfloat16))
    assert big.pipeline_layers() == (3,) + (4,) * 14 + (2,) and big.params_dtype == "bfloat16"


def test_model_provider_contract_and_hook(mcore_single):
    from megatron_dsv3.moe.router import routers_of
    args = _megatron_args()
    megatron_lm.set_args(args)
    try:
        model = megatron_lm.model_provider(pre_process=True, post_process=True)
    finally:
        megatron_lm.set_args(None)
    assert type(model).__name__ == "DSV3Model" and model.config.moe_router_enable_expert_bias is False
    assert model.config.num_layers == 3 and model.config.hidden_size == 128
    # pretrain_gpt.forward_step: model(tokens, position_ids, attention_mask, labels=, loss_mask=, packed_seq_params=)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 32), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    loss_mask = torch.ones(2, 32)
    pos = torch.arange(32).expand(2, 32)
    out = model(tokens, pos, None, labels=labels, loss_mask=loss_mask, packed_seq_params=None)
    assert out.shape == (2, 32) and torch.isfinite(out).all()
    out.sum().backward()

    before = {n: r.expert_bias.clone() for n, r in routers_of(model)}
    writer = types.SimpleNamespace(scalars={}, add_scalar=lambda k, v, i: writer.scalars.__setitem__(k, v))
    res = megatron_lm.after_global_batch([model], args, writer=writer, iteration=1)
    for n, r in routers_of(model):
        delta = (r.expert_bias - before[n]).abs()
        assert float(delta.max()) == pytest.approx(0.01) and res["routers"][n]["tokens_per_expert"].sum() > 0
        assert int(r.tokens_per_expert.sum()) == 0          # counts reset for the next global batch
    assert model.mtp.loss_weight == pytest.approx(0.3)      # lambda at 128 tokens seen
    assert "mtp loss depth 1" in writer.scalars and any(k.startswith("moe/max_vio/") for k in writer.scalars)

    # a step the optimizer skipped (inf/NaN gradients): the counts are dropped, the bias does not move
    model(tokens, pos, None, labels=labels, loss_mask=loss_mask).sum().backward()
    before = {n: r.expert_bias.clone() for n, r in routers_of(model)}
    assert all(int(r.tokens_per_expert.sum()) > 0 for _, r in routers_of(model))
    res = megatron_lm.after_global_batch([model], args, update_successful=False)
    for n, r in routers_of(model):
        assert torch.equal(r.expert_bias, before[n]) and int(r.tokens_per_expert.sum()) == 0
        assert res["routers"][n]["bias_rate"] == 0.0


def test_optimizer_hook_runs_after_each_step_with_its_success():
    """The wrapped get_megatron_optimizer's optimizer calls after_global_batch after step(), with the step's
    update_successful (a skipped step must not move the bias)."""
    class Opt:
        def __init__(self):
            self.results = [(True, 1.0, 0), (False, float("inf"), 0)]

        def step(self):
            return self.results.pop(0)

    made = []
    factory = megatron_lm._optimizer_factory_with_dsv3(lambda config, chunks, **kw: made.append(chunks) or Opt())
    seen = []
    orig_after = megatron_lm.after_global_batch
    megatron_lm.after_global_batch = lambda model, args, **kw: seen.append((model, kw["iteration"],
                                                                            kw["update_successful"]))
    megatron_lm.set_args(_megatron_args(curr_iteration=4, log_interval=10))
    try:
        opt = factory("cfg", ["chunk"])
        assert opt.step() == (True, 1.0, 0)
        assert opt.step()[0] is False
    finally:
        megatron_lm.after_global_batch = orig_after
        megatron_lm.set_args(None)
    assert made == [["chunk"]] and seen == [(["chunk"], 5, True), (["chunk"], 5, False)]


def test_help_survives_a_stray_percent():
    """core_v0.19.0's --moe-paged-stash-buffer-size-factor-cuda help ends in "(e.g. 1.10 = 10%)."; argparse
    reads that as a format directive and --help dies. extra_args_provider escapes it; proper ones stay."""
    parser = argparse.ArgumentParser(prog="pretrain_gpt.py")
    parser.add_argument("--moe-paged-stash-buffer-size-factor-cuda", type=float, default=1.1,
                        help="Magnitude is headroom (e.g. 1.10 = 10%).")
    parser.add_argument("--lr", type=float, default=0.5, help="learning rate (default %(default)s)")
    with pytest.raises(ValueError):
        parser.format_help()
    megatron_lm.extra_args_provider(parser)
    text = parser.format_help()
    assert "= 10%)" in text and "(default 0.5)" in text and "--dsv3-preset" in text


class _FakePretrainGpt:
    """pretrain_gpt.py as the launcher uses it (its module globals)."""
    train_valid_test_datasets_provider = staticmethod(lambda n, vp_stage=None: (None, None, None))
    forward_step = staticmethod(lambda it, model: None)
    get_embedding_ranks = staticmethod(lambda ranks: ranks[:1])


def _fake_megatron_training(monkeypatch, calls):
    """megatron.training.{arguments, argument_utils} of core_v0.19.0, recording what the launcher calls."""
    arguments = types.ModuleType("megatron.training.arguments")
    utils = types.ModuleType("megatron.training.argument_utils")

    def parse_and_validate_args(extra_args_provider=None, ignore_unknown_args=False, args_defaults={}):
        calls.append(("parse", extra_args_provider, dict(args_defaults)))
        return types.SimpleNamespace(parsed=True)

    def pretrain_cfg_container_from_args(args, model_cfg=None):
        calls.append(("container", args.parsed, model_cfg))
        return "container"
    arguments.parse_and_validate_args = parse_and_validate_args
    utils.pretrain_cfg_container_from_args = pretrain_cfg_container_from_args
    training = types.ModuleType("megatron.training")
    training.arguments, training.argument_utils = arguments, utils
    for name, mod in (("megatron.training", training), ("megatron.training.arguments", arguments),
                      ("megatron.training.argument_utils", utils)):
        monkeypatch.setitem(sys.modules, name, mod)


def test_launcher_follows_pretrain_of_core_v0_19(monkeypatch):
    """core_v0.18+: parse first (our flags and hooks through extra_args_provider), then pretrain(config
    container, ...) with model=None in the container so that setup_model_and_optimizer builds through our
    model_provider (a ModelConfig there would build megatron's GPTModel)."""
    calls = []
    _fake_megatron_training(monkeypatch, calls)

    def pretrain(cfg_container, train_valid_test_dataset_provider, model_type, forward_step_func,
                 model_provider=None, process_non_loss_data_func=None, get_embedding_ranks=None, **kw):
        calls.append(("pretrain", cfg_container, train_valid_test_dataset_provider, model_provider,
                      forward_step_func, get_embedding_ranks))
    provider = object()
    megatron_lm._run_pretrain(_FakePretrainGpt, provider, pretrain)
    P = _FakePretrainGpt
    assert calls == [("parse", megatron_lm.extra_args_provider, {"tokenizer_type": "HuggingFaceTokenizer"}),
                     ("container", True, None),
                     ("pretrain", "container", P.train_valid_test_datasets_provider, provider, P.forward_step,
                      P.get_embedding_ranks)]


def test_launcher_follows_pretrain_of_core_v0_16():
    """core_v0.16-0.17: pretrain() parses, given extra_args_provider and args_defaults."""
    calls = []

    def pretrain(train_valid_test_dataset_provider, model_provider, model_type, forward_step_func,
                 process_non_loss_data_func=None, extra_args_provider=None, args_defaults={},
                 get_embedding_ranks=None, **kw):
        calls.append((model_provider, extra_args_provider, args_defaults, get_embedding_ranks))
    provider = object()
    megatron_lm._run_pretrain(_FakePretrainGpt, provider, pretrain)
    assert calls == [(provider, megatron_lm.extra_args_provider, {"tokenizer_type": "HuggingFaceTokenizer"},
                      _FakePretrainGpt.get_embedding_ranks)]


def test_launcher_skips_make_of_prebuilt_dataset_helpers(monkeypatch):
    """Megatron-LM's initialize runs `make` in megatron/core/datasets and exits on failure; the megatron-core
    wheel has the helpers built and no Makefile (the first H200 run stopped there)."""
    import megatron.core.datasets.utils as U
    pytest.importorskip("megatron.core.datasets.helpers_cpp")
    monkeypatch.setattr(U, "compile_helpers", lambda: pytest.fail("make must not run"))
    megatron_lm.use_prebuilt_dataset_helpers()
    U.compile_helpers()


def test_launcher_needs_a_megatron_lm_checkout(tmp_path):
    with pytest.raises(SystemExit, match="--megatron-lm"):
        megatron_lm.main(["--megatron-lm", str(tmp_path), "--num-layers", "2"])
    with pytest.raises(SystemExit, match="--megatron-lm needs"):
        megatron_lm.main(["--megatron-lm"])


# ---- --dsv3-pipeline-schedule: DualPipe(V) as Megatron-LM's forward_backward_func ------------------------------------
def test_dualpipe_flags_and_refusals():
    """--dsv3-pipeline-schedule reaches ParallelConfig; what cannot work is one line naming the flag."""
    parser = megatron_lm.extra_args_provider(argparse.ArgumentParser())
    assert parser.parse_args(["--dsv3-pipeline-schedule", "dualpipev"]).dsv3_pipeline_schedule == "dualpipev"
    ok = dict(num_layers=4, pipeline_model_parallel_size=2, mtp_num_layers=1, global_batch_size=8,
              micro_batch_size=1, data_parallel_size=1)
    cfg = megatron_lm.config_from_megatron_args(_megatron_args(dsv3_pipeline_schedule="dualpipev", **ok))
    assert cfg.parallel.pipeline_schedule == "dualpipev" and cfg.pipeline_layers() == (1, 1, 1, 1)
    cfg = megatron_lm.config_from_megatron_args(_megatron_args(dsv3_pipeline_schedule="dualpipe", **ok))
    assert cfg.parallel.pipeline_schedule == "dualpipe" and cfg.pipeline_layers() == (2, 2)
    assert megatron_lm.config_from_megatron_args(_megatron_args(**ok)).parallel.pipeline_schedule == "1f1b"
    bad = [(dict(pipeline_model_parallel_size=1), "^--dsv3-pipeline-schedule dualpipe needs "
                                                  "--pipeline-model-parallel-size >= 2, got 1"),
           (dict(pipeline_model_parallel_size=3, num_layers=6), "^--dsv3-pipeline-schedule dualpipe needs an even "
                                                                "--pipeline-model-parallel-size"),
           (dict(virtual_pipeline_model_parallel_size=2), "^--dsv3-pipeline-schedule dualpipe with "
                                                          "--num-virtual-stages-per-pipeline-rank"),
           (dict(overlap_grad_reduce=True), "^--overlap-grad-reduce with --dsv3-pipeline-schedule dualpipe"),
           (dict(overlap_moe_expert_parallel_comm=True), "^--overlap-moe-expert-parallel-comm with"),
           (dict(pipeline_model_parallel_layout="Et|tL"), "^--pipeline-model-parallel-layout with"),
           (dict(global_batch_size=2), "^--pipeline-schedule dualpipe needs an even number of micro-batches >= 2 x "
                                       r"--pipeline-model-parallel-size \(4; .*--global-batch-size 2 / "),
           (dict(rampup_batch_size=["2", "2", "100"]), r"--global-batch-size 2 / \(--micro-batch-size 1"),
           (dict(reset_position_ids=True), "^--reset-position-ids with more than 2 pipeline stages")]
    for kw, msg in bad:
        variant = "dualpipev" if "reset_position_ids" in kw else "dualpipe"
        with pytest.raises(ValueError, match=msg):
            megatron_lm.config_from_megatron_args(_megatron_args(dsv3_pipeline_schedule=variant, **{**ok, **kw}))


def test_schedule_installed_where_megatron_lm_training_gets_it(monkeypatch):
    """install_hooks replaces megatron.training.training.get_forward_backward_func (the module global train() and
    evaluate() call: `get_forward_backward_func()` in core_v0.16.1, `(schedule_pg_collection=...)` in core_v0.19.0):
    ours under --dsv3-pipeline-schedule, Megatron-LM's own otherwise."""
    T = types.ModuleType("megatron.training.training")
    T.get_megatron_optimizer = lambda *a, **k: None
    T.get_forward_backward_func = lambda *a, **k: ("mcore", a, k)
    training = types.ModuleType("megatron.training")
    training.training = T
    monkeypatch.setitem(sys.modules, "megatron.training", training)
    monkeypatch.setitem(sys.modules, "megatron.training.training", T)
    monkeypatch.setattr(megatron_lm, "_HOOKED", False)
    assert megatron_lm.install_hooks() and megatron_lm.install_hooks()        # idempotent
    try:
        for variant in ("dualpipe", "dualpipev"):
            megatron_lm.set_args(_megatron_args(dsv3_pipeline_schedule=variant))
            for call in ((), {"schedule_pg_collection": "pgc"}):
                fb = T.get_forward_backward_func(**dict(call))
                assert fb.func is megatron_lm.forward_backward_megatron_lm and fb.args == (variant,)
        megatron_lm.set_args(_megatron_args(dsv3_pipeline_schedule=None))
        assert T.get_forward_backward_func(schedule_pg_collection="pgc") == ("mcore", (), {"schedule_pg_collection":
                                                                                           "pgc"})
    finally:
        megatron_lm.set_args(None)


S_PP, B_PP, M_PP = 16, 2, 4


def _pp_args(variant, **kw):
    return _megatron_args(dsv3_pipeline_schedule=variant, num_layers=4, seq_length=S_PP, params_dtype=torch.float64,
                          pipeline_model_parallel_size=1 if variant is None else 2, mtp_num_layers=1,
                          micro_batch_size=B_PP, global_batch_size=B_PP * M_PP, data_parallel_size=1, seed=7, **kw)


def _pp_batches():
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(M_PP):
        tokens = torch.randint(0, 256, (B_PP, S_PP), generator=g)
        out.append({"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
                    "position_ids": torch.arange(S_PP).repeat(B_PP, 1),
                    "loss_mask": (torch.rand(B_PP, S_PP, generator=g) > 0.2).double()})
    return out


def _pretrain_gpt_forward_step(seen):
    """pretrain_gpt.py's forward_step as it reads a batch: by megatron-core's parallel_state, no batch on a middle
    stage; the first stage gets tokens and position_ids, the last (with MTP) labels and loss_mask and the tokens
    (get_batch_on_this_tp_rank on a TP rank != 0, which receives only its stage's broadcasts). loss_func as
    pretrain_gpt's (sum of masked losses, token count, the 'lm loss' report), in the model's dtype."""
    from functools import partial
    from megatron.core import parallel_state as ps

    def loss_func(loss_mask, output):
        losses, mask = output.reshape(-1), loss_mask.reshape(-1)
        loss = (losses * mask).sum()
        n = mask.sum().to(torch.int)
        return loss, n, {"lm loss": torch.cat([loss.detach().view(1), n.detach().to(loss.dtype).view(1)])}

    def forward_step(data_iterator, model):
        first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        tokens = labels = loss_mask = pos = None
        if first or last:
            b = next(data_iterator)
            tokens, pos = b["tokens"], b["position_ids"]
            if last:
                labels, loss_mask = b["labels"], b["loss_mask"]
        place = megatron_lm._unwrap_placement(model)
        seen.append((None if place is None else place.stage, tokens is not None, labels is not None))
        return model(tokens, pos, None, labels=labels, loss_mask=loss_mask), partial(loss_func, loss_mask)
    return forward_step


def _global_grads(chunks):
    out = {}
    for c, chunk in enumerate(chunks):
        for n, p in chunk.named_parameters():
            if n.startswith("decoder.layers."):
                i, rest = n[len("decoder.layers."):].split(".", 1)
                n = f"decoder.layers.{chunk.decoder.layers[int(i)].layer_number - 1}.{rest}"
            out[(c, n)] = p.grad.clone()
    return out


def _megatron_lm_rank(rank, variant):
    """One pipeline rank of Megatron-LM's loop as far as our pieces go: get_model's no-virtual-stage branch calls
    the model provider once and keeps the list it gets; train_step and evaluate call the installed
    get_forward_backward_func's function with their arguments."""
    from megatron.core import parallel_state as ps
    megatron_lm.set_args(_pp_args(variant))
    try:
        model = megatron_lm.model_provider(pre_process=ps.is_pipeline_first_stage(),
                                           post_process=ps.is_pipeline_last_stage(), config=None, pg_collection=None)
        model.model_type = "encoder_or_decoder"                       # get_model's next line
        model = model if isinstance(model, list) else [model]
        fb = megatron_lm._schedule_factory_with_dsv3(lambda *a, **k: None)(schedule_pg_collection=None)
        seen = []
        common = dict(forward_step_func=_pretrain_gpt_forward_step(seen), model=model, num_microbatches=M_PP,
                      seq_length=S_PP, micro_batch_size=B_PP, decoder_seq_length=None, adjust_tensor_shapes_fn=None,
                      p2p_communicator=None, pg_collection=None)
        losses = fb(data_iterator=iter(_pp_batches()), forward_only=False, force_all_reduce=False, **common)
        grads = _global_grads(model)
        for c in model:
            c.zero_grad()
        with torch.no_grad():
            evals = fb(data_iterator=iter(_pp_batches()), forward_only=True, **common)
        return {"losses": losses, "evals": evals, "grads": grads, "seen": seen,
                "stages": [c.placement.stage for c in model], "types": [c.model_type for c in model],
                "pre_post": [(c.pre_process, c.post_process) for c in model]}
    finally:
        megatron_lm.set_args(None)


def _megatron_lm_reference():
    """The whole model in one process under megatron-core's no-pipelining schedule, the same forward_step."""
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining
    from megatron_dsv3.testing import single_process
    with single_process():
        megatron_lm.set_args(_pp_args(None))
        try:
            model = megatron_lm.model_provider(pre_process=True, post_process=True)
            losses = forward_backward_no_pipelining(
                forward_step_func=_pretrain_gpt_forward_step([]), data_iterator=iter(_pp_batches()), model=[model],
                num_microbatches=M_PP, seq_length=S_PP, micro_batch_size=B_PP)
        finally:
            megatron_lm.set_args(None)
        return losses, {n: g for (_, n), g in _global_grads([model]).items()}


@pytest.mark.parametrize("variant", ["dualpipev", "dualpipe"])
def test_installed_schedule_runs_megatron_lm_train_step_on_gloo(variant):
    """PP = 2 on two gloo ranks, float64, tiny preset with 4 layers + MTP: the chunks Megatron-LM's get_model keeps
    (the provider's two, placed by the schedule), pretrain_gpt's forward_step reading its batch by parallel_state
    (each chunk answered in its own role: the first-stage chunk tokens only, the last-stage chunk the labels, a
    middle chunk nothing), loss reports on the last pipeline rank where train_step reads them, in micro-batch
    order and equal to the no-pipelining reference (also the forward-only pass evaluate runs). Tolerances
    (float64): reports 1e-12 relative (bit-equal in most runs; one run of several on this 2-core machine differed
    in the last bits, which a CPU reduction split by another thread count gives), gradients 1e-12 absolute (the
    deferred weight gradients sum in another order)."""
    from megatron_dsv3.testing import run_distributed
    results = run_distributed(_megatron_lm_rank, 2, pp=2, variant=variant, timeout=300)
    ref_losses, ref_grads = _megatron_lm_reference()
    want_stages = {"dualpipev": [[0, 3], [1, 2]], "dualpipe": [[0, 1], [1, 0]]}[variant]
    assert [r["stages"] for r in results] == want_stages
    assert all(t == ["encoder_or_decoder"] * 2 for t in [r["types"] for r in results])
    n_stages = 4 if variant == "dualpipev" else 2
    for r in results:
        for stage, has_tokens, has_labels in r["seen"]:
            assert (has_tokens, has_labels) == (stage in (0, n_stages - 1), stage == n_stages - 1), (stage, r["seen"])
    assert {s for r in results for s, _, _ in r["seen"]} == set(range(n_stages))
    assert results[0]["losses"] == [] and results[0]["evals"] == []
    for got in (results[1]["losses"], results[1]["evals"]):
        assert len(got) == M_PP
        for g, rep in enumerate(got):
            torch.testing.assert_close(rep["lm loss"], ref_losses[g]["lm loss"], rtol=1e-12, atol=0)
    seen = set()
    for r in results:
        for (c, name), grad in r["grads"].items():
            err = float((grad - ref_grads[name]).abs().max())
            assert err <= 1e-12, (variant, c, name, err)
            seen.add(name)
    assert seen == set(ref_grads)
    assert all(float(g.abs().max()) > 0 for n, g in ref_grads.items() if "expert_bias" not in n)
