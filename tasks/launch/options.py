"""How to launch: the one declaration of every launch option.

Each field of `LaunchOptions` is, under the same name, a `launch`/`bench`/`stage-and-launch` flag
(`--field-name`, or the `flag` its metadata names) and a parameter of the `stage-and-launch` flow,
so `prefect deployment run stage-and-launch/... -p concurrency=64` and `--concurrency 64` are one
thing. `check()` is the only place an option is checked; its errors name the flag.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from modelferry.tasks import pins
from modelferry.tasks.errors import SettingsError
from modelferry.tasks.launch.fit import MEMORY_MIB

TARGETS = ("local", "sky")
SOURCES = ("auto", "r2", "hub")
MODES = ("cluster", "job", "serve")
STRATEGIES = ("stream", "prefetch")
BOTH = "both"  # bench and stage-and-launch: each strategy in turn
STRATEGY_HELP = "stream: Run:ai streamer over S3; prefetch: s5cmd to local disk, then load"

# The accelerators we offer are those whose memory the fit knows (fit.MEMORY_MIB), by SkyPilot's
# names. SkyPilot itself accepts unknown GPU names offline (only its optimizer would catch them), so
# we check here.
GPU_COUNTS = (1, 2, 4, 8)


def _option(default, help: str, **flag):
    """A field with what its command-line flag needs (help, and `flag`/`metavar` where the name alone won't do)."""
    return field(default=default, metadata={"help": help, **flag})


@dataclass(frozen=True)
class LaunchOptions:
    """Where and how to launch, as the user gave it."""

    target: str = _option("local", "sky: SkyPilot spot GPUs; local: the local target on this machine (default)",
                          choices=("sky", "local"))
    source: str = _option("auto", "auto: the bucket if staged and intact, else the Hub; r2: bucket only; hub: Hub only")
    mode: str = _option("cluster", "cluster: one node, stopped when idle (--idle-minutes); job: a managed job, "
                                   "recovered from preemption; serve: a SkyServe service, one replica")
    strategy: str = _option("stream", STRATEGY_HELP)
    accelerators: list[str] | None = _option(
        None, "GPUs to allow, e.g. L4:1 or A100:2 (repeatable; default: every GPU whose memory fits the model)",
        metavar="GPU[:N]")
    concurrency: int | None = _option(None, "Run:ai streamer readers (default: sized on the node, one per CPU "
                                            "core, 2-32)")
    compile_cache: bool = _option(True, "don't restore/save vLLM's torch.compile and Triton caches through the bucket",
                                  flag="--no-compile-cache")
    vllm_image: str | None = _option(None, f"the node's container image (default: {pins.VLLM_IMAGE}, "
                                           "the release the local target runs)", metavar="IMAGE")
    ready_timeout: float = _option(1800, "how long to wait for /health before tearing down (default 1800)",
                                   metavar="SECONDS")
    max_model_len: int | None = _option(
        None, "the context to serve, in tokens: GPUs are fitted to the weights plus its KV cache (default: the "
              "model's full context where a GPU option holds it, else the longest that fits each node)",
        metavar="TOKENS")
    memory_limit: int | None = _option(
        None, "Run:ai streamer CPU buffer in bytes, for the whole node (default: sized at start from the node's "
              "available memory and GPU count; 0: one buffer the size of the largest tensor)", metavar="BYTES")
    memory: str | None = _option(
        None, "host memory for every GPU option, in SkyPilot's syntax: GiB, '+' for at least, e.g. 64+ (default: "
              "sized from the weights and the GPU count)", metavar="GIB[+]")
    idle_minutes: int = _option(30, "--mode cluster and the local node: stop vLLM after this many minutes without a "
                                    "request (vLLM's /metrics), kept nodes too; SkyPilot then takes the cluster down "
                                    "(default 30)", metavar="MINUTES")
    use_spot: bool = _option(True, "on-demand instead of spot GPUs", flag="--on-demand")
    ondemand_fallback: bool = _option(
        False, "--mode serve: while the spot replica starts or is preempted, SkyServe also runs an on-demand one "
               "(faster to answer after a preemption; each cold start then pays for two GPU nodes until the spot "
               "one is ready)")
    disk_size: int | None = _option(None, "node disk (default: 256 GB, or 2.5 x the model + 64 GB when bigger)",
                                    metavar="GB")
    extra_vllm_args: str = _option("", "more `vllm serve` arguments, e.g. '--enforce-eager' (the context: --max-model-len)", metavar="ARGS")

    @classmethod
    def pick(cls, values: dict) -> LaunchOptions:
        """The options among `values` (a flow's parameters, parsed flags), by field name."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})

    def each_strategy(self) -> list[LaunchOptions]:
        """One LaunchOptions per strategy to run: both of them in turn for `--strategy both`."""
        if self.strategy == BOTH:
            return [dataclasses.replace(self, strategy=s) for s in STRATEGIES]
        return [self]

    def check(self) -> None:
        """Every option, and the one combination that can't work (a mode the local target lacks).
        Errors name the flag to change. `--strategy both` passes: it means each strategy in turn."""
        _one_of("--target", self.target, TARGETS)
        _one_of("--source", self.source, SOURCES)
        _one_of("--mode", self.mode, MODES)
        _one_of("--strategy", self.strategy, (*STRATEGIES, BOTH))
        if self.concurrency is not None and not 1 <= self.concurrency <= 256:
            raise SettingsError(f"--concurrency {self.concurrency} is out of range: use 1-256 (default: one per core of the node)")
        _check_memory_limit(self.memory_limit)
        if self.memory is not None:
            host_memory_gib(self.memory)
        if self.max_model_len is not None and self.max_model_len < 16:
            raise SettingsError(f"--max-model-len {self.max_model_len} is too short: give a context in tokens, "
                                "e.g. 8192, or leave it unset to fit the model's own")
        if not 0 < self.ready_timeout <= 6 * 3600:
            raise SettingsError(f"--ready-timeout {self.ready_timeout:g} is out of range: use 1-21600 seconds")
        if self.idle_minutes < 1:
            raise SettingsError("--idle-minutes must be at least 1")
        if self.disk_size is not None and not 32 <= self.disk_size <= 65536:
            raise SettingsError(f"--disk-size {self.disk_size} is out of range: use 32-65536 GB")
        if self.accelerators:
            parse_accelerators(self.accelerators)
        if {"--max-model-len", "--max_model_len"} & {arg.split("=")[0] for arg in self.extra_vllm_args.split()}:
            raise SettingsError("--extra-vllm-args: give the context as --max-model-len TOKENS, so that the GPUs are "
                                "fitted to it")
        if self.ondemand_fallback and not (self.mode == "serve" and self.use_spot):
            raise SettingsError("--ondemand-fallback is for --mode serve on spot GPUs: SkyServe's fallback from spot "
                                "to on-demand replicas")
        if self.target == "local" and self.mode != "cluster":
            raise SettingsError(f"--mode {self.mode} needs --target sky: the local target is one node")


def _check_memory_limit(limit: int | None) -> None:
    # -1 is the streamer's "unbounded": a buffer the size of every file streamed, per rank, which is
    # the host OOM this option exists to prevent; so it is refused rather than passed on.
    if limit is None or limit == 0 or limit >= 2**20:
        return
    if limit == -1:
        raise SettingsError("--memory-limit -1 (unbounded) is refused: the streamer would buffer every file it "
                            "streams and can exhaust the host; leave it unset to size it from the node, or give BYTES")
    if limit < 0:
        raise SettingsError(f"--memory-limit {limit} is not a size: give BYTES, or leave it unset to size it "
                            "from the node")
    raise SettingsError(f"--memory-limit {limit} is in bytes, far below any tensor: e.g. 8589934592 for 8 GiB")


def host_memory_gib(spec: str) -> float:
    """The GiB a `--memory` value asks for ("64", "64+", "12.5+"), or a SettingsError naming the flag."""
    number = spec[:-1] if spec.endswith("+") else spec
    try:
        gib = float(number)
    except ValueError:
        gib = 0
    if not gib > 0 or not number.replace(".", "", 1).isdigit():
        raise SettingsError(f"--memory {spec!r} is not a size: give GiB, with '+' for at least, e.g. 64+")
    return gib


def _one_of(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SettingsError(f"unknown {flag} {value!r}: choose one of {', '.join(choices)}")


def parse_accelerators(specs: list[str]) -> dict[str, int]:
    """["L4:1", "A100"] -> {"L4": 1, "A100": 1}; unknown names are refused with the known list."""
    out = {}
    for spec in specs:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, count = part.partition(":")
            if name not in MEMORY_MIB:
                raise SettingsError(f"--accelerators: unknown accelerator {name!r}: known are {', '.join(MEMORY_MIB)}")
            try:
                n = int(count or 1)
            except ValueError:
                raise SettingsError(f"bad accelerator count in {part!r}: use NAME:COUNT, e.g. L4:1") from None
            if n not in GPU_COUNTS:
                raise SettingsError(f"accelerator count {n} in {part!r}: use one of {GPU_COUNTS}")
            out[name] = n
    return out
