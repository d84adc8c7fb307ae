"""Continuing a run: a :class:`~iddpm.checkpoints.run_dir.Checkpoint` into a :class:`~iddpm.train.trainer.Trainer`,
and the one line saying what was restored (users of the original asked after its resume silently restarted)."""

from __future__ import annotations

from iddpm.config import ConfigError
from iddpm.runtime.seeding import restore_rng_state
from iddpm.train.ema import EMA


def _report(done: list[str], fresh: list[str], what: str, restored: bool) -> None:
    (done if restored else fresh).append(what)


def restore_checkpoint(trainer, ckpt, *, restore_rng: bool = True) -> str:
    """Load ``ckpt`` into ``trainer`` (model, EMA rates, optimizer, step, timestep-sampler state, data position,
    fp16 loss scale, RNG, checkpoint health); what the checkpoint lacks, or what no longer matches (a new EMA
    rate, another batch size or precision, another number of processes), starts fresh.  Returns one line:
    ``resumed PATH at step N: restored model, EMA 0.9999, optimizer, ...; fresh: ...``."""
    try:
        trainer.model.load_state_dict(ckpt.model, strict=True)
    except RuntimeError as exc:  # backstop: app.check_resume_config names the differing flag first
        first = str(exc).strip().splitlines()[-1].strip()
        raise ConfigError(f"{ckpt.path}: its weights do not fit the model these settings build ({first}); "
                          "give the model flags it was trained with") from None
    done, fresh = ["model"], []
    trainer.ema = EMA(trainer.model, trainer.tcfg.ema_rates)
    for i, rate in enumerate(trainer.ema.rates):
        if rate in ckpt.emas:
            trainer.ema.load_state_dict(i, ckpt.emas[rate])
    for got, label in ((True, "EMA {}"), (False, "EMA {} (from the weights)")):
        rates = [str(r) for r in trainer.ema.rates if (r in ckpt.emas) == got]
        if rates:
            (done if got else fresh).append(label.format(", ".join(rates)))
    if ckpt.optimizer is not None:
        trainer.optimizer.load_state_dict(ckpt.optimizer)
    _report(done, fresh, "optimizer", ckpt.optimizer is not None)
    st = ckpt.state
    trainer.step = int(st.get("step", 0))
    trainer._last_saved_step = trainer.step
    sampler_state = st.get("sampler") or {}
    ok = hasattr(trainer.sampler, "load_state_dict") and sampler_state.get("type") == type(trainer.sampler).__name__
    if ok:
        trainer.sampler.load_state_dict(sampler_state)
    _report(done, fresh, f"timestep-sampler state ({trainer.tcfg.schedule_sampler})", ok)
    ok = bool(st.get("data")) and hasattr(trainer.data, "load_state_dict") and \
        st.get("global_batch", trainer.global_batch) == trainer.global_batch
    if ok:
        trainer.data.load_state_dict(st["data"])
    _report(done, fresh, "data position", ok)
    if trainer.precision.scaling:
        ok = bool(st.get("scaler")) and st.get("precision") == trainer.precision.mode
        if ok:
            trainer.precision.load_state_dict(st["scaler"])
        _report(done, fresh, "fp16 loss scale", ok)
    rng = st.get("rng")
    ok = bool(restore_rng and rng and len(rng) == trainer.dist.world_size)
    if ok:
        restore_rng_state(rng[trainer.dist.rank])
    _report(done, fresh, "RNG", ok)
    trainer.health.load_state_dict(st.get("health"), resumed_step=trainer.step, resumed_path=ckpt.path)
    line = f"resumed {ckpt.path} at step {trainer.step}: restored {', '.join(done)}"
    return line + (f"; fresh: {', '.join(fresh)}" if fresh else "")
