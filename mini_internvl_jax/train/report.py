"""Per-step device metrics -> host numbers, progress bar, metrics.jsonl and TensorBoard.

Throughput (tokens/s, model TFLOP/s per device, MFU) is averaged over each logging window; the
run's first step (trace + compile) is logged on its own as `first_step_time` and kept out.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from tqdm import tqdm

from mini_internvl_jax import configlib
from mini_internvl_jax.batch import STATS_PREFIX
from mini_internvl_jax.data.tokenizer import load_tokenizer
from mini_internvl_jax.train import flops
from mini_internvl_jax.train.compile_cache import CacheStats
from mini_internvl_jax.train.config import TrainConfig
from mini_internvl_jax.train.metrics import MetricsLog, describe_samples, mfu, peak_tflops


def adapter_parts(cfg: TrainConfig) -> frozenset[str]:
    if not cfg.lora.rank:
        return frozenset()
    return frozenset({"llm", "vision"} if cfg.lora.vision else {"llm"})


class Reporter:
    def __init__(self, cfg: TrainConfig, model_cfg, start: int, n_devices: int):
        self.primary = jax.process_index() == 0
        log_dir = cfg.log.dir or cfg.checkpoint.dir
        self.log = MetricsLog(
            log_dir if self.primary else None, tensorboard=cfg.log.tensorboard,
            start_step=start, wandb=cfg.log.wandb if self.primary else None,
            run_config={**configlib.to_dict(cfg), "resolved_model": configlib.to_dict(model_cfg)})
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.flops_fn = lambda real_tiles: flops.step_flops(
            model_cfg, batch=cfg.batch_size, seq_len=cfg.seq_len, tiles=real_tiles,
            trainable=frozenset(flops.PARTS) - cfg.frozen_components,
            adapters=adapter_parts(cfg))
        self.n_devices = n_devices
        self.peak = cfg.log.peak_tflops or peak_tflops(jax.devices()[0].device_kind)
        self.bar = None
        if self.primary and cfg.log.progress_bar:
            self.bar = tqdm(total=cfg.total_steps, initial=start, unit="step",
                            dynamic_ncols=True)
        self.window: list[dict] = []
        self.first_step_time: float | None = None
        self.time_to_first_step: float | None = None
        self.cache_hits: int | None = None
        self.first_step_logged = False
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.last_time = time.perf_counter()

    def report(self, step: int, metrics, extra: dict) -> dict:
        host = {k: v.item() for k, v in jax.device_get(metrics).items()}
        host.update(extra)
        now = time.perf_counter()
        host["step_time"] = now - self.last_time
        self.last_time = now
        if self.first_step_time is None:
            self.first_step_time = host["step_time"]
        else:
            self.window.append(host)
        self.first_loss = host["loss"] if self.first_loss is None else self.first_loss
        self.last_loss = host["loss"]
        if self.bar is not None:
            self.bar.update(1)
        if step % self.cfg.log.every == 0 or step == self.cfg.total_steps:
            self._flush(step, host)
        return host

    def _flush(self, step: int, last: dict) -> None:
        w, self.window = self.window, []
        out = {k: last[k] for k in ("loss", "grad_norm", "lr", "accuracy", "skipped")}
        out.update({k: v for k, v in last.items() if k.startswith("pref/")})  # MPO
        if w:
            out["loss"] = float(np.mean([h["loss"] for h in w]))
            seconds = sum(h["step_time"] for h in w)
            out["step_time"] = seconds / len(w)
            out["tokens_per_s"] = sum(h["tokens"] for h in w) / seconds
            out["tiles_per_s"] = sum(h["real_tiles"] for h in w) / seconds
            flops_total = sum(self.flops_fn(h["real_tiles"]) for h in w)
            out["model_tflops_per_s_per_device"] = flops_total / seconds / 1e12 / self.n_devices
            m = mfu(flops_total / len(w), seconds / len(w), self.n_devices, self.peak)
            if m is not None:
                out["mfu"] = m
            for k in w[0]:
                if k.startswith(STATS_PREFIX):
                    out["data_" + k[len(STATS_PREFIX):]] = sum(h[k] for h in w)
        if not self.first_step_logged:
            out["first_step_time"] = self.first_step_time
            if self.time_to_first_step is not None:
                out["time_to_first_step"] = self.time_to_first_step
                out["compile_cache_hits"] = self.cache_hits
            self.first_step_logged = True
        self.log.write(step, out)
        if self.bar is not None:
            post = {"loss": f"{out['loss']:.4f}"}
            if "tokens_per_s" in out:
                post["tok/s"] = f"{out['tokens_per_s']:.0f}"
            if "mfu" in out:
                post["mfu"] = f"{100 * out['mfu']:.1f}%"
            self.bar.set_postfix(post)
        elif self.primary:
            print(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in out.items()),
                  flush=True)

    def first_step_ready(self, seconds: float, cache: CacheStats) -> None:
        """What a (re)start cost: from entering the trainer to the first step's results."""
        self.time_to_first_step, self.cache_hits = seconds, cache.hits
        if self.primary:
            msg = f"time to first step {seconds:.1f} s ({cache.describe()})"
            if self.bar is not None:
                self.bar.write(msg)
            else:
                print(msg, flush=True)

    def log_samples(self, step: int, host_batch: dict[str, np.ndarray]) -> None:
        """A few samples of the run's first micro-batch (tiles + decoded text) to TensorBoard."""
        if self.log.tb is None:
            return
        if self.cfg.tokenizer is not None:
            decode = load_tokenizer(self.cfg.tokenizer).decode
        else:  # synthetic data without a tokenizer: show the ids
            def decode(ids):
                return " ".join(map(str, ids))
        texts, images = describe_samples(
            {k: v[0] for k, v in host_batch.items()}, decode=decode,
            image_token_id=self.model_cfg.image_token_id,
            num_image_tokens=self.model_cfg.num_image_tokens)
        self.log.samples(step, texts, images)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.log.close()
